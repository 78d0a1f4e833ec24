"""
Benchmark converters: the test files of VQA-RAD, PathVQA, SLAKE, PMC-VQA and GEMeX-RMCoT as published
-> the benchmark JSONL that `evaluate.py --bench` reads (paper §4.1 benchmarks, §B.4 protocol).

Output schema (one object a line; the authority is evaluate.py's docstring):
  {"id": str, "image": absolute path, "question": str, "answer": str, "answer_type": "closed" | "open",
   "choices": [str, ...] (optional), "answer_index": int (with choices)}
The output file's stem becomes the benchmark name in evaluate.py's table (data/benchmarks/vqa-rad.jsonl
-> "vqa-rad" -> VQA-RAD), so keep the format's name as the stem.

What each format becomes:
  vqa-rad, pathvqa, slake  image / question / answer; closed or open from the file's own answer_type
                           (CLOSED/OPEN) when present, else closed = a yes/no answer. SLAKE: English only.
  pmc-vqa                  four choices "A:..".."D:.." (letters stripped), the answer as a letter
                           (Answer_label) or as text (`Answer`, or the published misspelling `Anwser`).
  gemex                    a one-letter answer with options -> closed with choices; any other answer
                           (a list: its items joined by ", ") is open when question_type says so, else
                           typed as above.
Images are resolved against --images; parquet files that embed the image bytes have them written as
PNGs into <out stem>_images/ next to the output.

Reads:  one published file: .json (a list, or {split: list}), .jsonl, .csv or .parquet (needs pyarrow).
Writes: the --out JSONL; prints the item counts and warns about image paths that do not exist.

Commands (from the repository root):
    python tools/convert_benchmarks.py --format vqa-rad --src VQA_RAD/testset.json --images VQA_RAD/images \\
        --out data/benchmarks/vqa-rad.jsonl
    python tools/convert_benchmarks.py --format slake --src Slake1.0/test.json \\
        --out data/benchmarks/slake.jsonl
    python tools/convert_benchmarks.py --format pmc-vqa --src PMC-VQA/test_clean.csv \\
        --images PMC-VQA/images --out data/benchmarks/pmc-vqa.jsonl
    (formats: vqa-rad | pathvqa | slake | pmc-vqa | gemex; .json, .jsonl, .csv or .parquet (needs pyarrow))
"""
import argparse
import csv
import io
import json
import os
import re
import sys
from collections import Counter

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from pipeline import io as IO  # noqa: E402
from evaluate import EvalError  # noqa: E402
from pipeline.vqa_metrics import normalize  # noqa: E402

FORMATS = ["vqa-rad", "pathvqa", "slake", "pmc-vqa", "gemex"]


# ----------------------------------------------------------------------------------------------------
# 1. Reading a published file and its fields.
# ----------------------------------------------------------------------------------------------------
def read_records(src):
    """.json (a list, or {split: list}), .jsonl, .csv or .parquet -> list of dicts."""
    if not os.path.isfile(src):
        raise EvalError(f"--src {src}: no such file")
    ext = os.path.splitext(src)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EvalError(f"{src}: reading parquet needs the 'pyarrow' package, which is not "
                            "installed (pip install pyarrow), or give the benchmark's .json/.csv file "
                            "instead") from None
        return pq.read_table(src).to_pylist()
    if ext == ".csv":
        with open(src, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if ext == ".jsonl":
        return [r for _, r in IO.read_jsonl(src, EvalError)]
    with open(src) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise EvalError(f"{src}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):  # {"test": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise EvalError(f"{src}: expected a list of question records")
    return data


def pick(rec, keys, src, n, required=True):
    """The first non-empty field of `keys` (benchmarks spell their fields differently)."""
    for k in keys:
        if k in rec and rec[k] not in (None, ""):
            return rec[k]
    if required:
        raise EvalError(f"{src} record {n}: none of the fields {list(keys)} "
                        f"(fields present: {sorted(rec)[:12]})")
    return None


def image_field(rec, keys, src, n, images, out_dir, name):
    """An image given as a file name (resolved in `images`) or as parquet bytes (written as PNG)."""
    v = pick(rec, keys, src, n)
    if isinstance(v, dict) and v.get("bytes"):
        os.makedirs(os.path.join(out_dir, f"{name}_images"), exist_ok=True)
        path = os.path.join(out_dir, f"{name}_images", f"{n:06d}.png")
        Image.open(io.BytesIO(v["bytes"])).save(path)
        return os.path.abspath(path)
    if isinstance(v, dict):
        v = v.get("path")
    return os.path.abspath(os.path.join(images, str(v)))


def closed_type(rec, answer):
    """The file's own label (answer_type CLOSED/OPEN) when present, else closed = a yes/no answer."""
    t = str(rec.get("answer_type", "")).strip().lower()
    if t in ("closed", "open"):
        return t
    return "closed" if normalize(answer) in ("yes", "no") else "open"


def strip_letter(text):
    """'B: MRI', '(b) MRI', 'B. MRI' -> 'MRI'."""
    return re.sub(r"^\s*\(?[A-Da-d]\)?\s*[:.)]\s*", "", str(text)).strip()


# ----------------------------------------------------------------------------------------------------
# 2. One record -> one item of the schema above.
# ----------------------------------------------------------------------------------------------------
IMAGE_KEYS = ("image", "img_name", "image_name", "image_path", "img_path", "Figure_path", "img_id")


def pmc_vqa_answer(r, src, n):
    """Four lettered choices; the answer as a letter (Answer_label) or as one of the choice texts."""
    choices = [strip_letter(pick(r, (f"Choice {c}",), src, n)) for c in "ABCD"]
    label = pick(r, ("Answer_label", "Anwser_label"), src, n, required=False)
    ans = str(pick(r, ("Answer", "Anwser"), src, n))
    key = (label or ans).strip()
    if len(key) == 1 and key.upper() in "ABCD":
        idx = "ABCD".index(key.upper())
    else:
        hits = [i for i, c in enumerate(choices) if normalize(c) == normalize(strip_letter(ans))]
        if not hits:
            raise EvalError(f"{src} record {n}: answer {ans!r} is none of the choices {choices}")
        idx = hits[0]
    return dict(answer=choices[idx], answer_type="closed", choices=choices, answer_index=idx)


def gemex_answer(r, src, n):
    """A one-letter answer with options -> closed with choices; otherwise the answer items joined."""
    ans = pick(r, ("answer", "Answer", "gt_answer"), src, n)
    opts = r.get("options") or r.get("choices")
    if isinstance(opts, dict):
        opts = [opts[k] for k in sorted(opts)]
    letters = [a.strip() for a in (ans if isinstance(ans, list) else [ans])]
    if opts and len(letters) == 1 and len(letters[0]) == 1 and letters[0].upper() in "ABCDEFGH":
        idx = "ABCDEFGH".index(letters[0].upper())
        opts = [strip_letter(o) for o in opts]
        return dict(answer=opts[idx], answer_type="closed", choices=opts, answer_index=idx)
    text = ", ".join(str(a) for a in letters)  # a list answer (several findings or letters), joined
    qt = str(r.get("question_type", r.get("type", ""))).lower()
    return dict(answer=text, answer_type="open" if "open" in qt else closed_type(r, text))


def convert_records(fmt, recs, src, images, out_dir, name):
    """Records of one published file -> items of the benchmark JSONL schema, in file order."""
    items = []
    for n, r in enumerate(recs, 1):
        if fmt == "slake" and str(r.get("q_lang", "en")).lower() != "en":
            continue  # English questions only (SLAKE is bilingual)
        img = image_field(r, IMAGE_KEYS, src, n, images, out_dir, name)
        q = str(pick(r, ("question", "Question"), src, n))
        it = dict(id=f"{name}-{r.get('qid', r.get('id', n))}", image=img, question=q)
        if fmt == "pmc-vqa":
            it.update(pmc_vqa_answer(r, src, n))
        elif fmt == "gemex":
            it.update(gemex_answer(r, src, n))
        else:  # vqa-rad, pathvqa, slake: image / question / answer
            ans = str(pick(r, ("answer", "Answer"), src, n))
            it.update(answer=ans, answer_type=closed_type(r, ans))
        items.append(it)
    return items


# ----------------------------------------------------------------------------------------------------
# 3. Command line.
# ----------------------------------------------------------------------------------------------------
def get_args(argv=None):
    ap = argparse.ArgumentParser(prog="tools/convert_benchmarks.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=FORMATS, help="which benchmark the --src file is")
    ap.add_argument("--src", required=True,
                    help="the published file (.json, .jsonl, .csv, or .parquet with pyarrow)")
    ap.add_argument("--images", help="folder the file's image names are relative to (default: imgs/ or "
                                     "images/ next to the file if present, else the file's folder)")
    ap.add_argument("--out", required=True, help="output JSONL (its stem becomes the benchmark name)")
    return ap.parse_args(argv)


def convert(args):
    """Parsed arguments -> the written items (also returned, for tests)."""
    src_dir = os.path.dirname(args.src)
    images = args.images or next((d for d in (os.path.join(src_dir, "imgs"), os.path.join(src_dir, "images"))
                                  if os.path.isdir(d)), os.path.dirname(os.path.abspath(args.src)))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.out))[0]
    items = convert_records(args.format, read_records(args.src), args.src, images, out_dir, name)
    missing = [it["image"] for it in items if not os.path.isfile(it["image"])]
    with open(args.out, "w") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)
    kinds = Counter(it["answer_type"] for it in items)
    warn = f"; WARNING {len(missing)} images not found, e.g. {missing[:2]} (check --images)" \
        if missing else ""
    print(f"{args.out}: {len(items)} items ({kinds['closed']} closed, {kinds['open']} open){warn}")
    return items


def main(argv=None):
    return convert(get_args(argv))


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        sys.exit(f"convert_benchmarks.py: error: {e}")
