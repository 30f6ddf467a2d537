#!/usr/bin/env python
"""The official TeleChat2 PyTorch code (the "peer") on one benchmark case: one JSON line on stdout.

Run by `benchmark.py side` with an interpreter that has torch and transformers (`pip install
'tc2[peer]'`); it imports neither tc2 nor MindSpore. One case per process: peak RSS is the
process's. The cases, the timing loop and the JSON fields are `bench_protocol`'s (shared with
`bench_tc2.py`): random seeded weights, init normal(0, 0.02), fp32; train step = forward with
labels + backward + clip_grad_norm_(1.0) + AdamW(0.9, 0.95, wd 0.1); decode = a manual greedy
loop over past_key_values (the official model has no working generate() under transformers 5).

--modeling_dir is a folder with the official `model/115B/{modeling_telechat.py,
configuration_telechat.py, generation_utils.py}` (github:Tele-AI/TeleChat2; the 115B file has
GQA and dynamic NTK and serves every size). Nothing official is bundled with tc2. The files are
made to run on the CPU in memory, never edited in place (`patch_source`; ../shared/design/PEER.md):
every `.cuda()` dropped, the RoPE tables' `.half()` -> `.float()` (else they
are rounded to float16), and the flash-attn / einops asserts in FlashSelfAttention.__init__
made no-ops (configs are built with flash_attn=False, so neither is used). The patched text is
written with an `__init__.py` into a temporary package (the files import each other
relatively), deleted at exit.

An already-patched folder is accepted: a patch whose official text is absent is fine when the
text it would produce (or, for the asserts, the class they sat in without them) is there. When
neither is there, the file is not the version these patches were written for and the run stops
with an error naming the file and the patch, before torch is imported. After patching, any
`.cuda(` or `.half(` left in a code line is an error too (a GPU-only call the patches do not
know).

Compile mode: torch.compile(model) (inductor; a clearly labelled aot_eager fallback if inductor
cannot compile a probe function). By default each process gets a fresh, empty inductor cache
dir, so first_step_s is a cold compile (--inductor_cache default reuses torch's disk cache).
"""
import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Union

from bench_protocol import CASES, SEQ_LENGTH, SHAPES, decode_fields, limit_threads, measure, result, tokens_per_step

PACKAGE = "telechat_peer_official"


class Patch(NamedTuple):
    """One CPU patch: `original` (regex) is replaced by `replacement`; `applied` (regex) is what
    shows the file already had it."""
    what: str
    original: str
    replacement: Union[str, Callable]
    applied: str


def _assert_to_pass(m: "re.Match") -> str:
    """A (possibly multi-line) assert -> `pass`, keeping the line count so tracebacks point
    at the official line numbers."""
    return (f"{m.group(1)}pass  # CPU patch (flash_attn=False): was assert {m.group(2)} is not None"
            + "\n" * m.group(0).count("\n"))


PATCHES = {
    "modeling_telechat.py": (
        Patch("RoPE inv_freq: float32 on the CPU (drop .half() and .cuda())",
              r"torch\.arange\(0, dim, 2\)\.float\(\)\.half\(\) / dim\)\)\.cuda\(\)",
              "torch.arange(0, dim, 2).float() / dim))",
              r"torch\.arange\(0, dim, 2\)\.float\(\)(?:\.float\(\))? / dim\)\)"),
        Patch("RoPE cos/sin tables: .half() -> .float()",
              r"(emb\.(?:cos|sin)\(\)\[:, None, :\])\.half\(\)", r"\1.float()",
              r"emb\.(?:cos|sin)\(\)\[:, None, :\]\.float\(\)"),
        Patch("FlashSelfAttention.__init__: the flash-attn / einops asserts -> no-ops",
              r"^([ \t]*)assert (flash_attn_unpadded_func|rearrange) is not None\b(?:[^\n(]*\([^)]*\)|[^\n]*)$",
              _assert_to_pass, r"class FlashSelfAttention\b"),
    ),
    "configuration_telechat.py": (),
    "generation_utils.py": (),
}
GPU_ONLY = re.compile(r"\.(cuda|half)\(")


class PatchError(ValueError):
    """The official files are not the version the CPU patches were written for."""


def patch_source(filename: str, text: str) -> str:
    """`text` of the official `filename` made to run on the CPU (PATCHES[filename]); PatchError
    naming the file when a patch has neither its official text nor its result to find, or when
    a GPU-only call is left."""
    for p in PATCHES[filename]:
        text, n = re.subn(p.original, p.replacement, text, flags=re.MULTILINE)
        if n == 0 and not re.search(p.applied, text, flags=re.MULTILINE):
            raise PatchError(f"{filename}: CPU patch '{p.what}' found neither the official text "
                             f"(/{p.original}/) nor its patched form (/{p.applied}/); this is not the "
                             "official model/115B file the patches were written for")
    for i, line in enumerate(text.splitlines(), 1):
        if GPU_ONLY.search(line) and not line.lstrip().startswith("#"):
            raise PatchError(f"{filename}:{i}: still calls .cuda()/.half() after the CPU patches: "
                             f"{line.strip()!r}")
    return text


def patched_sources(modeling_dir: str) -> dict:
    """{filename: patched text} of the official files in `modeling_dir` (PatchError naming the
    first file that is missing or not the expected version). Cheap and torch-free, so
    `benchmark.py side` checks a folder with it before starting any run."""
    out = {}
    for filename in PATCHES:
        src = os.path.join(modeling_dir, filename)
        if not os.path.isfile(src):
            raise PatchError(f"{src}: not found (the folder must hold the official model/115B files "
                             f"{', '.join(PATCHES)})")
        with open(src, encoding="utf-8") as f:
            out[filename] = patch_source(filename, f.read())
    return out


def write_patched_package(modeling_dir: str, dest: str) -> str:
    """The official files of `modeling_dir`, patched, as the package folder `dest` (created)."""
    os.makedirs(dest)
    for filename, text in patched_sources(modeling_dir).items():
        with open(os.path.join(dest, filename), "w", encoding="utf-8") as f:
            f.write(text)
    open(os.path.join(dest, "__init__.py"), "w").close()
    return dest


def load_official(package_dir: str):
    """(TelechatConfig, TelechatForCausalLM) from the package folder (relative imports work)."""
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(package_dir, "__init__.py"),
                                                  submodule_search_locations=[package_dir])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    spec.loader.exec_module(pkg)
    cfg_mod = importlib.import_module(PACKAGE + ".configuration_telechat")
    mdl_mod = importlib.import_module(PACKAGE + ".modeling_telechat")
    return cfg_mod.TelechatConfig, mdl_mod.TelechatForCausalLM


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modeling_dir", required=True, help="folder with the official model/115B files")
    p.add_argument("--case", required=True, choices=sorted(CASES))
    p.add_argument("--mode", default="eager", choices=["eager", "compile"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before, the first included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (compile mode)")
    p.add_argument("--inductor_cache", default="fresh", choices=["fresh", "default"],
                   help="fresh: a new empty TORCHINDUCTOR_CACHE_DIR per process (cold compile time, "
                        "deleted at exit); default: torch's shared on-disk cache (warm after a first run)")
    return p.parse_args(argv)


def inductor_works(torch):
    """Return (ok, message): compile and run a tiny function with inductor (needs a C++ compiler)."""
    try:
        import torch._dynamo
        f = torch.compile(lambda a: (a * 2.0).sin().sum(), backend="inductor")
        f(torch.randn(8))
        torch._dynamo.reset()
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def build_model(torch, TelechatConfig, TelechatForCausalLM, shape: dict, seed: int):
    """The official model at `shape`, fp32, seeded, every Linear/Embedding normal(0, 0.02)."""
    cfg = TelechatConfig(**shape, training_seqlen=SEQ_LENGTH, base_seqlen=SEQ_LENGTH, seq_length=SEQ_LENGTH,
                         flash_attn=False, tie_word_embeddings=False, use_cache=True,
                         hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = TelechatForCausalLM(cfg).float()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                mod.weight.normal_(0.0, 0.02)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif hasattr(mod, "variance_epsilon") and hasattr(mod, "weight"):   # RMSNorm
                mod.weight.fill_(1.0)
    return model


def train_case(torch, model, fwd, case, gen):
    """One AdamW step per call on one of 4 fixed random [B, T] batches."""
    B, T, V = case["batch"], case["seq"], model.config.vocab_size
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [torch.randint(0, V, (B, T), generator=gen) for _ in range(4)]
    losses = []

    def step(i):
        x = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        out = fwd(input_ids=x, labels=x, use_cache=False, return_dict=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))

    return step, lambda timed: dict(loss_first=losses[0], loss_last=losses[-1])


def prefill_case(torch, model, fwd, case, gen):
    """One forward over [B, T] with the cache on, producing the first new token."""
    B, T = case["batch"], case["seq"]
    model.eval()
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)

    def step(i):
        with torch.no_grad():
            out = fwd(input_ids=x, attention_mask=mask, use_cache=True, return_dict=True)
            out.logits[:, -1].argmax(-1)

    return step, lambda timed: {}


def decode_case(torch, model, fwd, case, gen):
    """Greedy generation: prefill, then N - 1 cached calls of one token each. Official defect
    (transformers 5): the past length is read from the head dimension, so every call gets an
    explicit mask covering past + new token."""
    B, P, N = case["batch"], case["prompt"], case["new_tokens"]
    model.eval()
    prompt = torch.randint(4, model.config.vocab_size, (B, P), generator=gen)
    prefill_times, decode_times, outputs = [], [], []

    def step(i):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fwd(input_ids=prompt, attention_mask=torch.ones(B, P, dtype=torch.long), use_cache=True,
                      return_dict=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            toks = [nxt]
            for length in range(P + 1, P + N):
                out = fwd(input_ids=nxt, past_key_values=out.past_key_values,
                          attention_mask=torch.ones(B, length, dtype=torch.long), use_cache=True, return_dict=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(nxt)
            t2 = time.perf_counter()
        prefill_times.append(t1 - t0)
        decode_times.append(t2 - t1)
        outputs.append(torch.cat(toks, 1))
        return t2 - t1

    def fields(timed):
        return dict(decode_fields(case, prefill_times, decode_times, timed),
                    same_tokens_every_run=all(torch.equal(o, outputs[0]) for o in outputs),
                    tokens_row0_head=outputs[0][0, :8].tolist())

    return step, fields


CASE_KINDS = {"train": train_case, "prefill": prefill_case, "decode": decode_case}


def run(args, package_dir: str, loadavg_start) -> dict:
    """The case of `args` on the official model loaded from `package_dir` -> the JSON object."""
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    case = CASES[args.case]
    model = build_model(torch, *load_official(package_dir), SHAPES[case["shape"]], args.seed)
    backend, backend_note, fwd = "eager", "", model
    if args.mode == "compile":
        backend = args.backend
        if backend == "inductor":
            ok, msg = inductor_works(torch)
            if not ok:
                backend, backend_note = "aot_eager", f"FALLBACK: inductor failed ({msg})"
        fwd = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, fields = CASE_KINDS[case["kind"]](torch, model, fwd, case, gen)
    measured = measure(step, tokens_per_step(case), args.warmup, args.steps)
    return result(args.case, "torch", args.mode, measured, loadavg_start, **fields(args.steps),
                  mode=args.mode, backend=backend, backend_note=backend_note,
                  inductor_cache=args.inductor_cache if args.mode == "compile" else None,
                  params=sum(p.numel() for p in model.parameters()), torch=torch.__version__,
                  transformers=transformers.__version__, threads=torch.get_num_threads(),
                  steps=args.steps, warmup=args.warmup, seed=args.seed)


def main(argv=None):
    args = parse_args(argv)
    loadavg_start = os.getloadavg()
    limit_threads(args.threads)                         # before torch is imported
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="tc2_peer_") as tmp:
        if args.mode == "compile" and args.inductor_cache == "fresh":
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        try:
            package_dir = write_patched_package(os.path.abspath(args.modeling_dir), os.path.join(tmp, PACKAGE))
        except PatchError as e:
            print(f"bench_peer: {e}", file=sys.stderr)
            return 2
        res = run(args, package_dir, loadavg_start)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
