"""
A checkpoint with its scaffolds re-attached, to read its latent states: which checkpoint keeps them, the model
with pj_in + decoder and/or the visual projector loaded (the LoRA merged, as deployed), and the encoder its ROI
targets came from. explain.py's two windows and evaluate.py's pointing game read the latents through here.
Each problem is one `error` (the caller's own error class) naming the file and what to do.
"""
import os

from safetensors import safe_open

import model as M
from pipeline import io as IO


def has_scaffolds(folder):
    """Does the checkpoint keep a scaffold explain can re-attach (decoder + pj_in, or the projector)?
    A K = 0 model and the tiny backbone's pretraining have none."""
    path = os.path.join(folder, "scaffold.safetensors")
    if not os.path.isfile(path):
        return False
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    return any(k.startswith(("decoder.", "vp.")) for k in keys)


def load_explainer(ckpt, device, dtype, error=IO.InputError):
    """-> (vital with pj_in/decoder and/or vp, processor, dec_tokenizer or None, config)."""
    config = IO.read_ckpt_config(ckpt)
    sc_path = os.path.join(ckpt, "scaffold.safetensors")
    if not os.path.isfile(sc_path):
        raise error(f"checkpoint '{ckpt}' has no scaffold.safetensors: explain needs the decoder + "
                    "pj_in and/or the visual projector (train with --lambda-sem > 0 / "
                    "--lambda-vis > 0)")
    with safe_open(sc_path, "pt") as f:
        keys = list(f.keys())
        d_v = f.get_slice("vp.out.weight").get_shape()[0] if "vp.out.weight" in keys else None
    has_dec = any(k.startswith("decoder.") for k in keys) and any(k.startswith("pj_in.") for k in keys)
    if not has_dec and d_v is None:
        raise error(f"{sc_path} holds neither the decoder + pj_in nor the visual projector "
                    f"(keys: {keys[:5]})")
    backbone_path = IO.ckpt_field(config, ckpt, "backbone_path", "args.backbone")
    backbone, processor = IO.load_backbone(backbone_path, dtype, device)
    r, alpha = IO.ckpt_field(config, ckpt, "arch.lora")
    M.add_lora(backbone, r, alpha, 0.0)
    decoder, dec_tok = None, None
    if has_dec:
        decoder_path = IO.ckpt_field(config, ckpt, "decoder_path", "args.decoder")
        decoder, dec_tok = IO.load_decoder(decoder_path, dtype, device)
    vital = M.VITAL(backbone, decoder, d_v, config.get("args", {}).get("projector", "res_mlp_ln"),
                    lambda_sem=1.0 if has_dec else 0.0, lambda_vis=1.0 if d_v else 0.0,
                    pause_steps=IO.pause_rows(ckpt), readout=IO.readout_of(config)).to(device)
    IO.load_checkpoint(ckpt, vital, scaffolds=True)
    vital.eval()  # no dropout in the projector or the decoder
    M.set_lora_merged(backbone, True)
    return vital, processor, dec_tok, config


def resolve_encoder(config, ckpt, override, error=IO.InputError):
    """The encoder the checkpoint's ROI targets came from -> (folder, kind, size, where the name came from).
    The first source that names a folder wins: --encoder, config.json, the run's roi.safetensors, the tiny
    preset's <models>/encoder."""
    args = config.get("args", {})
    named = [(override, "siglip", 448, "--encoder")] if override else []
    if config.get("encoder_path"):
        named.append((config["encoder_path"], config.get("encoder_kind") or "siglip",
                      config.get("encoder_image_size") or 448, f"{ckpt}/config.json"))
    roi = os.path.join(args.get("data") or "", "roi.safetensors")
    if args.get("data") and os.path.isfile(roi):
        with safe_open(roi, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("encoder_path"):
            named.append((meta["encoder_path"], meta.get("encoder_kind", "siglip"),
                          int(meta.get("image_size", 448)),
                          f"{roi} (the encoder that made the L_vis targets)"))
    if args.get("preset") == "tiny" and args.get("models"):
        named.append((os.path.join(args["models"], "encoder"), "siglip", 448,
                      f"{ckpt}/config.json args.models"))
    if not named:
        raise error(f"{ckpt}/config.json names no encoder folder: pass --encoder FOLDER (the SigLIP "
                    "encoder extract_roi.py used, e.g. MedSigLIP-448)")
    path, kind, size, src = named[0]
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise error(f"encoder folder '{path}' (from {src}) does not exist or holds no config.json: "
                    "pass --encoder FOLDER (the SigLIP encoder extract_roi.py used)")
    return path, kind, size, src
