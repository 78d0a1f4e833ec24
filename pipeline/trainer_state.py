"""
The trainer state of a training phase, written into every checkpoint (its trainer/ folder) so that
`train.py --resume` continues exactly where the checkpoint left off: tensors in safetensors (the optimizer's
moments, the RNG state of every rank as uint8), scalars in JSON. No pickle: torch.save is never used. Only
torch's RNG is consumed (dropout); the data order is a function of (seed, epoch), the lr of the step: so
step + moments + RNG make the resumed run exact.
"""
import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.io import CheckpointError


def gather_rng(device, world):
    """RNG state of every rank, collected on all ranks (uint8 tensors; all_gather, not pickled objects)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for name, s in states.items():
        if world > 1:
            parts = [torch.empty_like(s, device=device) for _ in range(world)]
            dist.all_gather(parts, s.to(device))
            out.update({f"rng.{name}.rank{r}": t.cpu() for r, t in enumerate(parts)})
        else:
            out[f"rng.{name}.rank0"] = s
    return out


def trainer_writer(opt, names, rng, scalars, finished):
    """A writer(path) for save_checkpoint's extra_files: path/state.safetensors + path/state.json.
    A finished phase keeps only the JSON: its Adam moments (2x the decoder's 1.7B in fp32)
    are never reused."""
    def write(path):
        os.makedirs(path)
        if finished:
            with open(os.path.join(path, "state.json"), "w") as f:
                json.dump(dict(scalars, finished=True), f, indent=2, allow_nan=False)
            return
        tensors, groups = dict(rng), []
        sd = opt.state_dict()
        for g, gnames in zip(sd["param_groups"], names):
            for idx, n in zip(g["params"], gnames):
                for field, v in sd["state"].get(idx, {}).items():
                    tensors[f"optim.{n}.{field}"] = v.detach().contiguous().cpu()
            groups.append({k: v for k, v in g.items() if k != "params"} | {"names": gnames})
        save_file(tensors, os.path.join(path, "state.safetensors"))
        with open(os.path.join(path, "state.json"), "w") as f:
            json.dump(dict(scalars, finished=False, param_groups=groups), f, indent=2, allow_nan=False)
    return write


def load_trainer(folder, opt, names, rank, device, error=CheckpointError):
    """Restore optimizer state and this rank's RNG from folder/trainer; returns the JSON scalars. A folder
    that cannot be resumed is one `error` (the stage's own error class)."""
    path = os.path.join(folder, "trainer")
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise error(f"{folder} has no trainer/ state: it cannot be resumed")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, "state.safetensors"))
    sd = opt.state_dict()
    if [g["names"] for g in state["param_groups"]] != names:
        raise error(f"{path}: the optimizer's parameters differ from this run's (other flags?)")
    per_param = {}  # "optim.<param name>.<field>" -> {name: {field: tensor}}
    for k, v in tensors.items():
        if k.startswith("optim."):
            n, field = k[len("optim."):].rsplit(".", 1)
            per_param.setdefault(n, {})[field] = v
    for g, saved in zip(sd["param_groups"], state["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "names"})
        sd["state"].update({idx: per_param[n] for idx, n in zip(g["params"], saved["names"])
                            if n in per_param})
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors[f"rng.cpu.rank{rank}"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    return state
