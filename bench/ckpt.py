"""
Activation checkpointing (pipeline/activation_checkpointing.py, train.py --grad-ckpt): what a VITAL training step keeps
for backward at K = 4, with and without it, and that it changes nothing else.

"Saved activations" are counted exactly: every tensor autograd saves for backward during one forward passes
through a torch.autograd.graph.saved_tensors_hooks pack hook; each storage is counted once, parameters are
not counted (bf16 copies that autocast makes of fp32 weights are, since they take memory). Inside a
checkpointed region torch's own hooks take over, so what is counted there is what the region really keeps:
its inputs. The script also checks that the loss and every gradient are the same both ways, and gives the
forward + backward time ratio (the price: each checkpointed layer runs its forward twice).

    python bench/ckpt.py                                    # tiny models (embedded/tiny.py), fp32, CPU
    python bench/ckpt.py --real --layers 2 --dtype bf16     # real widths and vocabularies, 2 LLM layers each
                                                            # (+ the full depth from pipeline/memory_plan.py's model)
    python bench/ckpt.py --real --device cuda --dtype bf16 --batch 4   # the full 8B model on a GPU

Target: saved activations at K = 4 reduced >= 3x.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model as M  # noqa: E402
from pipeline import activation_checkpointing as AC  # noqa: E402
from pipeline import memory_plan as MP  # noqa: E402
from pipeline import io as IO  # noqa: E402
from embedded.tiny import CHAT_TEMPLATE, make_tiny, make_tokenizer, real_configs  # noqa: E402

QUESTION = "Analyze the visual findings of the liver in this CT image and describe its location."
ANSWER = "The liver lies in the upper left part of the image with smooth edges and uniform intensity."
CHAIN = ["A large smooth bright organ is visible in the image.",
         "It occupies the upper left part of the image.", "Its edges are smooth and well defined.",
         "Its intensity is uniform compared with its surroundings."]


def build(real, layers=None, dtype=torch.float32, device="cpu", folder=None, d_v=None, vision_depth=None):
    """VITAL as train.py builds it: frozen backbone in `dtype` + LoRA (fp32), fp32 decoder and heads.
    real: random-weight Qwen3-VL-8B / Qwen3-1.7B shapes (demo/tiny.real_configs; `layers` LLM layers each,
    `vision_depth` ViT blocks: None keeps 27), else the tiny models written to `folder`.
    -> (vital, processor, decoder tokenizer, d_v)."""
    if not real:
        make_tiny(folder)
        bb, proc = IO.load_backbone(os.path.join(folder, "backbone"), dtype, device)
        dec, dtok = IO.load_decoder(os.path.join(folder, "decoder"), torch.float32, device)
        M.add_lora(bb, r=8, alpha=16)
        d_v = d_v or 48
    else:
        cfg, dcfg, _, tok = real_configs(layers, layers)
        if vision_depth:
            cfg.vision_config.depth = vision_depth
        old = torch.get_default_dtype()
        try:
            with torch.device(device):
                torch.set_default_dtype(dtype)  # random init straight in the target dtype
                bb = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
                torch.set_default_dtype(torch.float32)
                dec = transformers.Qwen3ForCausalLM(dcfg)
        finally:
            torch.set_default_dtype(old)
        tok.padding_side = "left"
        proc = IO.ImageOnlyQwen3VLProcessor(transformers.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2,
                                                                      temporal_patch_size=2),
                                           tok, chat_template=CHAT_TEMPLATE)
        dtok = make_tokenizer()
        dtok.padding_side = "right"
        M.add_lora(bb, r=64, alpha=128)
        d_v = d_v or 1152
    for m in M.lora_layers(bb):  # a trained-looking adapter (B != 0): LoRA really enters the gradients
        torch.nn.init.normal_(m.lora_B, std=1e-3)
    return M.VITAL(bb, dec, d_v).to(device), proc, dtok, d_v


def make_inputs(proc, dtok, B, K, px, d_v, device, seed=0):
    """B grey noise images of px x px with the same question, answer and 4-step chain (cut to K)."""
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray((rng.random((px, px)) * 255).astype("uint8")) for _ in range(B)]
    roi = F.normalize(torch.randn(B, d_v, generator=torch.Generator().manual_seed(seed)), dim=-1)
    batch = IO.make_batch(proc, dtok, imgs, [QUESTION] * B, [ANSWER] * B, [CHAIN[:K]] * B, K, roi=roi)
    return IO.batch_to(batch, device)


def saved_bytes(run, params):
    """-> ({"activations": bytes, "weight_copies": bytes} autograd keeps for backward while `run()` builds
    its graph, run()'s result). Each storage once; parameters excluded. weight_copies: tensors of a
    parameter's shape (or its transpose) in another dtype, i.e. autocast's bf16 casts of fp32 weights: they
    cost memory once per step whatever the batch. The tensors are held until the count is done, so that a
    freed address cannot be counted twice."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    dtypes = {}  # parameter shape (and its transpose) -> the dtypes parameters of that shape have
    for p in params:
        for shape in (tuple(p.shape), tuple(p.shape)[::-1]):
            dtypes.setdefault(shape, set()).add(p.dtype)
    seen, hold = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.data_ptr() not in seen:
            cast = t.dtype not in dtypes.get(tuple(t.shape), {t.dtype})
            seen[s.data_ptr()] = ("weight_copies" if cast else "activations", s.nbytes())
            hold.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    total = {"activations": 0, "weight_copies": 0}
    for kind, n in seen.values():
        total[kind] += n
    return total, out


def measure(vital, batch, K, ckpt, amp, device):
    """One training step's forward (saved bytes) and backward (time, gradients), checkpointing on or off."""
    AC.set_checkpointing(vital, ckpt)
    vital.zero_grad(set_to_none=True)
    params = list(vital.parameters())
    torch.manual_seed(0)  # the same dropout masks both ways
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    with amp:
        n, out = saved_bytes(lambda: vital(batch, K), params)
    out["loss"].backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    grads = {name: p.grad.detach().float().clone() for name, p in vital.named_parameters() if p.requires_grad}
    AC.set_checkpointing(vital, False)
    return dict(saved=n["activations"], copies=n["weight_copies"], loss=out["loss"].item(), s=dt, grads=grads)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="real widths and vocabularies (random weights)")
    ap.add_argument("--layers", type=int, help="--real: LLM layers of backbone and decoder (default 36/28)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="frozen backbone weights + autocast dtype (bf16 as train.py on a GPU)")
    ap.add_argument("--batch", type=int, default=2, help="samples per micro-batch")
    ap.add_argument("--K", type=int, default=4, help="latent steps")
    ap.add_argument("--px", type=int, help="image side (default 448 real, 96 tiny)")
    return ap.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    amp = (torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bf16"
           else torch.autocast(args.device.split(":")[0], enabled=False))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vital_ckpt_") as tmp:
        vital, proc, dtok, d_v = build(args.real, args.layers, dtype, args.device, tmp)
    vital.train()  # dropout on: checkpointing must replay the same masks
    px = args.px or (448 if args.real else 96)
    batch = make_inputs(proc, dtok, args.batch, args.K, px, d_v, args.device)
    off, on = (measure(vital, batch, args.K, c, amp, args.device) for c in (False, True))
    diff = max((off["grads"][n] - on["grads"][n]).abs().max().item() for n in off["grads"])
    mib = lambda b: b / 2 ** 20
    res = dict(saved_off=off["saved"], saved_on=on["saved"], ratio=off["saved"] / on["saved"],
               copies_off=off["copies"], copies_on=on["copies"],
               loss_off=off["loss"], loss_on=on["loss"], grad_max_diff=diff, time_ratio=on["s"] / off["s"],
               prefix_tokens=int(batch["prefix"]["input_ids"].shape[1]))
    size = (f"real widths, {args.layers or 'all'} LLM layers" if args.real
            else "tiny models (embedded/tiny.py)")
    print(f"activation checkpointing, {size}, {args.dtype}, batch {args.batch} x {px} px "
          f"({res['prefix_tokens']} prefix tokens), K = {args.K}, on {args.device}")
    print(f"  activations saved for backward without checkpointing  {mib(off['saved']):10.1f} MiB")
    print(f"  activations saved for backward with checkpointing     {mib(on['saved']):10.1f} MiB")
    print(f"  reduction                                             {res['ratio']:10.2f} x   (target >= 3)")
    print(f"  + autocast's bf16 copies of fp32 weights, per step    {mib(off['copies']):10.1f} MiB without, "
          f"{mib(on['copies']):.1f} MiB with (checkpointed layers re-cast theirs in backward)")
    print(f"  loss {off['loss']:.6f} vs {on['loss']:.6f}; max |gradient difference| {diff:.2e} "
          f"over {len(off['grads'])} trainable tensors")
    print(f"  forward + backward time with / without                {res['time_ratio']:10.2f} x   "
          "(one run; each checkpointed layer runs twice)")
    if args.real and args.layers:  # the full depth, from the activation model that bench/memory.py checks
        m = MP.dims(*real_configs()[:2], 64, d_v)
        P, T, L = res["prefix_tokens"], batch["answer_ids"].shape[1], batch["step_ids"].shape[2]
        kept = [sum(v for k, v in MP.activations(m, 1, P, args.K, T, L, c).items()
                    if k != "backward transient") for c in (False, True)]
        res["model_full_depth"] = kept
        print(f"  at the full 36 + 28 layers (pipeline/memory_plan.py's model): {mib(kept[0]):.0f} -> "
              f"{mib(kept[1]):.0f} MiB per sample ({kept[0] / kept[1]:.1f} x)")
    return res


if __name__ == "__main__":
    main()
