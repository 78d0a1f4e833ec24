"""
The plumbing every stage shares, between files on disk and the tensors model.py works on:

    1. strict JSON and JSONL        what every artifact is written with and read through
    2. images                       the student view of an image file, the same pixels for every stage
    3. model folders                Qwen3-VL backbone + processor, Qwen3 decoder, SigLIP encoder (local paths)
    4. the prompt contract          the closed-ended `ask`, the choices rule, the prefix, answers, step sentences
    5. checkpoints of a run         adapter + scaffolds (safetensors) + config.json, atomic; PEFT export

Stages import this file and model.py, never each other. No pickle anywhere: safetensors and JSON only.

Command:
    python -m pipeline.io info runs/tiny      # parameter counts of a folder with backbone/, decoder/, encoder/
"""
import argparse
import glob as globmod
import hashlib
import json
import os
import re
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3ForCausalLM,
                          Qwen3VLForConditionalGeneration, Qwen3VLProcessor, SiglipImageProcessorPil,
                          SiglipVisionModel)
from transformers.utils import is_accelerate_available

from model import LORA_TARGETS, add_lora, lora_layers

# ----------------------------------------------------------------------------------------------------
# 1. Strict JSON and JSONL.
# ----------------------------------------------------------------------------------------------------
class InputError(Exception):
    """A problem with an input file, as one line naming the file (and line). The readers below take the
    stage's own error class (`error=`), so each stage reports in its own name."""


def strict_json(obj, **kw):
    """json.dumps that refuses NaN and Infinity: Python would write them as bare NaN, which strict JSON
    readers reject. Every JSON and JSONL artifact of the pipeline is written through this."""
    return json.dumps(obj, allow_nan=False, **kw)


def strict_loads(text):
    """json.loads that refuses NaN and Infinity, as strict readers do (the reading half of strict_json)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def write_strict_json(obj, path):
    """A strict JSON file, written atomically (a temporary name, then rename)."""
    with open(path + ".tmp", "w") as fh:
        fh.write(strict_json(obj, indent=1) + "\n")
    os.replace(path + ".tmp", path)


def read_jsonl(path, error=InputError):
    """-> [(line number, object)] for the non-empty lines; a missing file or a bad line is one `error`."""
    if not os.path.isfile(path):
        raise error(f"{path}: no such file")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise error(f"{path} line {n}: not valid JSON "
                                f"({e.msg} at column {e.colno})") from None
    return rows


def slug(text):
    """A file-name-safe id part: lower case, runs of other characters -> '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------------------------------
# 2. Images.
# ----------------------------------------------------------------------------------------------------
def load_image(path):
    """The student view of an image file, the same pixels for every stage (training, evaluation, ROI
    features, explanation) -> RGB PIL image. Grey 8-bit -> 3 identical channels; 16-bit or float grey is
    scaled min-max to 8 bits first (PIL's own convert would clip it); RGBA drops its alpha."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            im = Image.fromarray(((a - lo) / max(hi - lo, 1e-8) * 255).round().astype(np.uint8))
        return im.convert("RGB")




def open_image(path, error=InputError):
    """load_image; a missing or unreadable file is one `error` naming it."""
    if not os.path.isfile(path):
        raise error(f"image '{path}': no such file")
    try:
        return load_image(path)
    except Exception as e:  # truncated, not an image, decompression bomb, ...
        raise error(f"image '{path}' cannot be read as an image ({type(e).__name__}: {e})") from None


def to_uint8(a):
    """[0, 1] floats -> uint8 pixels, rounded."""
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def colormap(t):
    """Values in [0, 1] (numpy array) -> uint8 RGB on a jet-like ramp (matplotlib is not a dependency); the
    colours of evaluate.py's collapse matrix and explain.py's heatmaps."""
    stops = np.array([(0, 0, 128), (0, 64, 255), (0, 224, 255), (128, 255, 128), (255, 224, 0), (255, 48, 0),
                      (128, 0, 0)], dtype=np.float64)
    x = np.clip(np.asarray(t, dtype=np.float64), 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    w = (x - i)[..., None]
    return ((1 - w) * stops[i] + w * stops[i + 1]).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# 3. Loading model folders. Real runs: Qwen3-VL-8B-Instruct, Qwen3-1.7B, MedSigLIP-448.
#    Tests and the demo: tiny models of the SAME classes written by embedded/tiny.py and read back here.
# ----------------------------------------------------------------------------------------------------
class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor (which needs torchvision): images and text only.
    Token expansion of <|image_pad|> and mm_token_type_ids (needed by M-RoPE) come from the parent."""
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _check_folder(path, model_types, what):
    cfg = os.path.join(str(path), "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{what}: no model folder at '{path}' (missing {cfg})")
    with open(cfg) as f:
        mt = json.load(f).get("model_type")
    if mt not in model_types:
        raise ValueError(f"{what}: '{path}' holds a '{mt}' model, expected one of {model_types}")


# The image pixel cap every stage applies (train.py --max-pixels): 448 x 448 = 200,704 pixels = 196 visual
# tokens (one per 32 x 32 pixels). Why 448: it is the resolution of the ROI targets (MedSigLIP-448), so the
# backbone sees the detail the targets were made from; MSD's 512 x 512 slices lose little; BiomedParse's
# 1024 x 1024 images would otherwise cost ~1,000 tokens and ~4x the activation memory each; and with it the
# default batch fits an 80 GB card (train.py --plan). Qwen3-VL's own processor allows up to ~16.7 M pixels.
MAX_PIXELS = 448 * 448


def _from_pretrained(cls, path, dtype, device):
    """cls.from_pretrained with the weights read straight onto `device`. With 6 ranks, loading on the host
    and then calling .to(device) would hold 6 full host copies at once (6 x 17 GB for Qwen3-VL-8B); with
    device_map={"": device} transformers materialises each tensor on the rank's own device. On CPU the host
    is the target, so the plain call is kept (same weights, bit for bit, and no accelerate needed)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cls.from_pretrained(path, dtype=dtype)
    if not is_accelerate_available():  # transformers needs accelerate for device_map
        print(f"[model] accelerate is not installed: loading {path} on the host, then moving it to {device}")
        return cls.from_pretrained(path, dtype=dtype).to(device)
    return cls.from_pretrained(path, dtype=dtype, device_map={"": device})


def load_backbone(path, dtype=torch.float32, device="cpu", max_pixels=MAX_PIXELS):
    """Qwen3-VL backbone + its image-only processor (prefixes are LEFT-padded: h_0 is the last column)."""
    _check_folder(path, ("qwen3_vl",), "backbone")
    model = _from_pretrained(Qwen3VLForConditionalGeneration, path, dtype, device).eval()
    return model, load_processor(path, max_pixels)


def load_processor(path, max_pixels=MAX_PIXELS):
    """The backbone folder's image-only processor. max_pixels caps its resize (never raises the folder's
    own cap; None or 0: the folder's)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    if max_pixels:
        image_processor.size["longest_edge"] = min(image_processor.size["longest_edge"], max_pixels)
    return ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=chat_template(path, tokenizer))


def chat_template(path, tokenizer):
    """The chat template: the tokenizer's own, else the folder's chat_template.json (where processor
    checkpoints such as Qwen3-VL-8B-Instruct keep it) or chat_template.jinja, else None (build_prefix's
    apply_chat_template then raises)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    for name in ("chat_template.json", "chat_template.jinja"):
        file = os.path.join(str(path), name)
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)["chat_template"] if name.endswith(".json") else f.read()
    return None


def load_decoder(path, dtype=torch.float32, device="cpu"):
    """Auxiliary text decoder (Qwen3-1.7B in the paper): its own embeddings, head and tokenizer."""
    _check_folder(path, ("qwen3",), "decoder")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    return _from_pretrained(Qwen3ForCausalLM, path, dtype, device), tokenizer


def load_encoder(path, dtype=torch.float32, device="cpu"):
    """Frozen SigLIP vision tower (MedSigLIP-448) + image processor; used for ROI targets and explain."""
    _check_folder(path, ("siglip_vision_model", "siglip"), "encoder")
    model = _from_pretrained(SiglipVisionModel, path, dtype, device).eval().requires_grad_(False)
    return model, SiglipImageProcessorPil.from_pretrained(path)


def device_and_dtype(name):
    """--device auto|cpu|cuda -> (torch.device, dtype): bf16 on a GPU, fp32 on the CPU."""
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32



# ----------------------------------------------------------------------------------------------------
# 4. The prompt contract (owned here; every stage imports it). Student view = raw image + question, with its
#    options when the item is asked closed-ended (`ask`). Prefix: chat-formatted user turn, generation prompt
#    open, LEFT-padded, so that h_0 is column -1.
#    Answer: right-padded, ends with <|im_end|>. Step sentences r_k: decoder tokens, each ending in EOS.
# ----------------------------------------------------------------------------------------------------
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def ask(question, choices=None):
    """The text of the user turn. Without choices: the question unchanged (explain.py's free question). With
    choices (§B.4: every QA pair is asked closed-ended): the question, the options one a line as "(A) text",
    then one instruction line. train.py, evaluate.py and the demo all ask through here, so an item is asked
    with the identical text in training and evaluation."""
    if not choices:
        return question
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices: the options are lettered A-Z, at most {len(LETTERS)}")
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\nAnswer with one of the options."


def choices_problem(record):
    """The closed-ended rule every stage checks: no 'choices' (absent or null), or a list of 2 to 26
    strings (lettered A-Z by ask) with an integer 'answer_index' into it. -> None, or what is wrong."""
    ch = record.get("choices")
    if ch is None:
        return None
    if (isinstance(ch, list) and 2 <= len(ch) <= len(LETTERS) and all(isinstance(c, str) for c in ch)
            and type(record.get("answer_index")) is int and 0 <= record["answer_index"] < len(ch)):
        return None
    return (f"'choices' needs a list of >= 2 strings and an 'answer_index' into it (at most {len(LETTERS)}: "
            "options A-Z, pipeline.io.ask)")


def build_prefix(processor, images, questions):
    """-> BatchFeature(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    for i, im in enumerate(images):
        if im is None:
            raise ValueError(f"prompt {i} has no image: VITAL answers questions about an image")
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]
    images = [im.convert("RGB") for im in images]
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def tokenize_answers(tokenizer, answers):
    """-> (ids, mask), (B, T) right-padded; every answer ends with <|im_end|> so generation can stop."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]
    return _pad_right(seqs, tokenizer.pad_token_id)


def tokenize_steps(dec_tokenizer, chains, K):
    """Reasoning sentences for the decoder -> (ids, mask), (B, K, L); missing steps are all padding."""
    eos = dec_tokenizer.eos_token_id
    seqs = []
    for chain in chains:
        for k in range(K):
            seqs.append(dec_tokenizer(chain[k], add_special_tokens=False)["input_ids"] + [eos]
                        if k < len(chain) else [])
    ids, mask = _pad_right(seqs, dec_tokenizer.pad_token_id)
    return ids.view(len(chains), K, -1), mask.view(len(chains), K, -1)


def make_batch(processor, dec_tokenizer, images, questions, answers, chains=None, K=0, roi=None, glob=None):
    """Everything VITAL.forward needs for one K-bucket of samples (images are PIL images)."""
    batch = dict(prefix=build_prefix(processor, images, questions))
    batch["answer_ids"], batch["answer_mask"] = tokenize_answers(processor.tokenizer, answers)
    if chains is not None and dec_tokenizer is not None and K > 0:
        batch["step_ids"], batch["step_mask"] = tokenize_steps(dec_tokenizer, chains, K)
    if roi is not None:
        batch["roi"] = roi
    if glob is not None:
        batch["global"] = glob
    return batch


def batch_to(batch, device):
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def _pad_right(seqs, pad_id):
    T = max([len(s) for s in seqs] + [1])
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask



# ----------------------------------------------------------------------------------------------------
# 5. Checkpoints of a run: safetensors for tensors, JSON for metadata, atomic folder writes, PEFT export;
#    and the identity of model folders and data files recorded in them.
# ----------------------------------------------------------------------------------------------------
class CheckpointError(Exception):
    """A checkpoint folder that is missing or lacks a field; the stages print it as one line."""


def read_ckpt_config(folder):
    """config.json of a checkpoint folder runs/<name>/phase<p>/ (it must hold adapter.safetensors too)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at '{folder}' (missing config.json; train.py writes "
                              "runs/<name>/phase<p>/)")
    if not os.path.isfile(os.path.join(folder, "adapter.safetensors")):
        raise CheckpointError(f"checkpoint '{folder}' has no adapter.safetensors")
    with open(path) as f:
        return json.load(f)


def ckpt_field(config, folder, *keys):
    """First present value of `keys` in a checkpoint config ('args.x' reads config['args']['x'])."""
    for k in keys:
        v = config
        for part in k.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is not None:
            return v
    raise CheckpointError(f"{folder}/config.json: no field {' or '.join(repr(k) for k in keys)}")


def save_checkpoint(folder, vital, config: dict, extra_files=None):
    """Write adapter.safetensors, scaffold.safetensors and config.json into folder atomically: everything
    goes to folder.tmp first and is renamed into place only when complete.
    extra_files: {name: writer(path)}."""
    tmp, old = folder.rstrip("/") + ".tmp", folder.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    adapter, scaffold = vital.trainable_state_dict()
    save_file({k: v.contiguous().cpu() for k, v in adapter.items()}, os.path.join(tmp, "adapter.safetensors"))
    if scaffold:
        save_file({k: v.contiguous().cpu() for k, v in scaffold.items()},
                  os.path.join(tmp, "scaffold.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, allow_nan=False)
    for name, writer in (extra_files or {}).items():
        writer(os.path.join(tmp, name))
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_into(module, tensors, path):
    own = dict(module.named_parameters())
    for k, v in tensors.items():
        if k not in own:
            raise ValueError(f"{path}: tensor '{k}' has no place in this model (another architecture?)")
        if own[k].shape != v.shape:
            raise ValueError(f"{path}: '{k}' has shape {tuple(v.shape)}, "
                             f"this model expects {tuple(own[k].shape)} "
                             "(checkpoint of another width or LoRA rank?)")
        with torch.no_grad():
            own[k].copy_(v)
    return len(tensors)


def load_checkpoint(folder, vital, scaffolds=True):
    """Load adapter (+ scaffolds) saved by save_checkpoint into an already-built VITAL. Returns config."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no checkpoint at '{folder}' (missing config.json)")
    with open(cfg_path) as f:
        config = json.load(f)
    adapter = load_file(os.path.join(folder, "adapter.safetensors"))
    pause = adapter.pop("pause", None)  # the pause arm's constants (train.py --feedback pause)
    if (pause is None) != (vital.pause is None):
        raise ValueError(f"{folder}/adapter.safetensors " + ("holds the pause arm's step embeddings; build VITAL "
                         "with pause_steps=pause_rows(folder)" if vital.pause is None else
                         "has no pause embeddings, but this VITAL was built for the pause arm"))
    if pause is not None:
        _load_into(vital, {"pause": pause}, f"{folder}/adapter.safetensors")
    expected = {n for n, _ in vital.backbone.named_parameters() if ".lora_" in n}
    if set(adapter) != expected:
        missing = sorted(expected - set(adapter))[:3] or sorted(set(adapter) - expected)[:3]
        raise ValueError(f"{folder}/adapter.safetensors does not match this backbone's LoRA layers "
                         f"(e.g. {missing})")
    _load_into(vital.backbone, adapter, f"{folder}/adapter.safetensors")
    sc_path = os.path.join(folder, "scaffold.safetensors")
    if scaffolds and os.path.isfile(sc_path):
        _load_into(vital, load_file(sc_path), sc_path)
    return config


def readout_of(config):
    """How a checkpoint's answer reads h_K (train.py --readout, model.latent_loop); 'head' (eq. 2) for a checkpoint
    from before the flag, which ran that."""
    return config.get("args", {}).get("readout") or "head"


def pause_rows(folder):
    """How many pause embeddings a checkpoint's adapter holds (0: the method itself, h_{k-1} fed back)."""
    with safe_open(os.path.join(folder, "adapter.safetensors"), "pt") as f:
        return f.get_slice("pause").get_shape()[0] if "pause" in f.keys() else 0


def export_peft(folder, vital, base_model_path=""):
    """PEFT-format copy of the adapter: adapter_model.safetensors + adapter_config.json."""
    layers = lora_layers(vital.backbone)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for n, p in vital.backbone.named_parameters():
        if ".lora_" in n:
            mod, which = n.rsplit(".", 1)  # "...q_proj", "lora_A"
            tensors[f"base_model.model.{mod}.{which}.weight"] = p.detach().contiguous().cpu()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    cfg = dict(peft_type="LORA", task_type=None, r=layers[0].r, lora_alpha=layers[0].alpha,
               lora_dropout=layers[0].dropout.p, bias="none", fan_in_fan_out=False, inference_mode=True,
               init_lora_weights=True, base_model_name_or_path=base_model_path,
               target_modules=(r".*language_model\.layers\.\d+\.(self_attn|mlp)\.("
                               + "|".join(LORA_TARGETS) + ")"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, allow_nan=False)


def fingerprint(folder):
    """sha256 of config.json + the first MiB of every weight file: cheap even for 16 GB,
    differs per weights."""
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    for p in sorted(globmod.glob(os.path.join(folder, "*.safetensors"))):
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def main():
    ap = argparse.ArgumentParser(description="VITAL model folders")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="print parameter counts of backbone/decoder/encoder under a folder")
    i.add_argument("folder", help="folder with backbone/, decoder/, encoder/")
    args = ap.parse_args()
    bb, _ = load_backbone(os.path.join(args.folder, "backbone"))
    dec, _ = load_decoder(os.path.join(args.folder, "decoder"))
    enc, _ = load_encoder(os.path.join(args.folder, "encoder"))
    n_lora = add_lora(bb)
    print(f"backbone {count_params(bb) / 1e6:.2f}M (LoRA layers {n_lora}), "
          f"decoder {count_params(dec) / 1e6:.2f}M, encoder {count_params(enc) / 1e6:.2f}M")


if __name__ == "__main__":    main()
