"""
The memory model of one training step (pipeline/memory_plan.py: what `train.py --plan` prints) checked against measured
peaks: this script, on CPU, with scaled-down configs of the real classes.

    python train.py --plan --phase 3                         # the model at the paper's setting
    python bench/memory.py                                   # the model vs measured CPU peaks
    python bench/memory.py --quick                           # two configurations only (the test)

The CPU check measures the peak resident memory of a whole step (forward, backward, AdamW) above the memory
held before it (weights, AdamW moments), with malloc returning every large block at once (mmap threshold
64 KiB) and the kernel's peak counter reset just before the step, each configuration in a fresh process;
the model predicts the same difference (gradients, weight copies, activations, transient).
"""
import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model as M  # noqa: E402
from pipeline import activation_checkpointing as AC  # noqa: E402
from pipeline import io as IO  # noqa: E402
from embedded.tiny import real_configs  # noqa: E402
from pipeline.memory_plan import activations, dims, param_counts, step_peak  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# The check: scaled-down configs of the real classes, a real training step, the peak measured on CPU.
# ----------------------------------------------------------------------------------------------------
CONFIGS = {  # name: (backbone width, layers, decoder width, layers, vocab, batch, image px, K, checkpointing)
    "w512-L4-b2": (512, 4, 256, 2, 8192, 2, 448, 4, False),
    "w512-L4-b2-ckpt": (512, 4, 256, 2, 8192, 2, 448, 4, True),
    "w512-L4-b4": (512, 4, 256, 2, 8192, 4, 448, 4, False),
    "w1024-L2-b2": (1024, 2, 512, 2, 16384, 2, 448, 4, False),
    "w512-L4-b2-px640-K2": (512, 4, 256, 2, 8192, 2, 640, 2, False),
    "w512-L4-b4-ckpt": (512, 4, 256, 2, 8192, 4, 448, 4, True),
}
QUICK = ["w512-L4-b2", "w512-L4-b2-ckpt"]


def scaled_configs(width, layers, dec_width, dec_layers, vocab):
    """real_configs with the LLM widths/depths/vocabularies scaled down (head_dim 128 and the M-RoPE sections
    kept) and a small ViT (3 blocks, deepstack taps 0-2): its activations are not kept (frozen, no grad)."""
    cfg, dcfg, _, tok = real_configs(layers, dec_layers)
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.vocab_size = width, 3 * width, vocab
    t.num_attention_heads, t.num_key_value_heads = width // 128, max(1, width // 512)
    v = cfg.vision_config
    v.depth, v.hidden_size, v.intermediate_size, v.num_heads = 3, 256, 512, 4
    v.deepstack_visual_indexes, v.out_hidden_size = [0, 1, 2], width
    dcfg.hidden_size, dcfg.intermediate_size, dcfg.vocab_size = dec_width, 3 * dec_width, vocab
    dcfg.num_attention_heads, dcfg.num_key_value_heads = dec_width // 128, max(1, dec_width // 256)
    return cfg, dcfg, tok


def rss_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def measure_one(name):
    """In this (fresh) process: build the config, one warm-up step (AdamW moments exist from then on), then
    the measured step. -> dict with the peak above the pre-step memory and the model's prediction."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks go back on free()
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ckpt import make_inputs
    width, layers, dwidth, dlayers, vocab, B, px, K, ck = CONFIGS[name]
    cfg, dcfg, tok = scaled_configs(width, layers, dwidth, dlayers, vocab)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    bb = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(old)
    M.add_lora(bb, 64, 128)
    for lora in M.lora_layers(bb):
        torch.nn.init.normal_(lora.lora_B, std=1e-3)
    d_v = 1152
    vital = M.VITAL(bb, transformers.Qwen3ForCausalLM(dcfg), d_v).train()
    AC.set_checkpointing(vital, ck)
    tok.padding_side = "left"
    from embedded.tiny import CHAT_TEMPLATE, make_tokenizer
    proc = IO.ImageOnlyQwen3VLProcessor(transformers.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2,
                                                                  temporal_patch_size=2), tok,
                                       chat_template=CHAT_TEMPLATE)
    dtok = make_tokenizer()
    dtok.padding_side = "right"
    batch = make_inputs(proc, dtok, B, K, px, d_v, "cpu")
    params = [p for p in vital.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = vital(batch, K)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    t = time.time()
    step()
    measured = (rss_kib("VmHWM") - before) * 1024
    P, T, L = batch["prefix"]["input_ids"].shape[1], batch["answer_ids"].shape[1], batch["step_ids"].shape[2]
    m = dims(cfg, dcfg, 64, d_v)
    counts = param_counts(cfg, dcfg, 64, d_v)
    act = activations(m, B, P, K, T, L, ck, a=2, mask=2)   # CPU dropout keeps a bf16 mask
    predicted, when = step_peak(counts, act, ck)
    return dict(name=name, P=P, T=T, L=L, measured=measured, predicted=predicted, when=when,
                grads=counts["trainable"] * 4, activations=sum(act.values()), s=time.time() - t)


def check(names):
    """Each configuration in a fresh process -> rows with measured and predicted step peaks."""
    rows = []
    for name in names:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name], capture_output=True,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = [l for l in res.stdout.splitlines() if l.startswith("{")]
        if res.returncode or not line:
            raise RuntimeError(f"{name}: {res.stderr[-2000:]}")
        rows.append(json.loads(line[-1]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration in this process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return None
    rows = check(QUICK if args.quick else list(CONFIGS))
    mib = lambda b: b / 2 ** 20
    print("peak memory of one training step above the memory held before it (CPU, bf16 autocast, AdamW; each "
          "configuration in a fresh process)")
    print(f"{'configuration':<22} {'prefix':>6} {'measured MiB':>12} {'model MiB':>10} {'error':>6}   "
          "(of which gradients / activations in the model)")
    for r in rows:
        r["error"] = (r["predicted"] - r["measured"]) / r["measured"]
        print(f"{r['name']:<22} {r['P']:>6} {mib(r['measured']):>12.1f} {mib(r['predicted']):>10.1f} "
              f"{100 * r['error']:>+5.0f}%   ({mib(r['grads']):.0f} / {mib(r['activations']):.0f})")
    print(f"largest |error| {100 * max(abs(r['error']) for r in rows):.0f}% (target <= 25%)")
    return rows


if __name__ == "__main__":
    main()
