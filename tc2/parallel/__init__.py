"""Multi-process plumbing: mesh and sharding rules, collectives, Ascend layouts, memory plan."""
