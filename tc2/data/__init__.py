"""Text to token rows: tokenizer, chat templates, SFT jsonl, packing, MindRecord, synthetic tasks."""
