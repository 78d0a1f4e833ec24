"""
The OpenAI-compatible LLM teacher of stage 1 (prepare_data.py --teacher openai, §A.2): one chat-completions
request with the teacher-only overlay as a data URL and the prompt of §A.2; a retry after the quality gate
(pipeline/quality_gate.py) names every violation (§A.3). Network errors, 429 and 5xx are retried with exponential
backoff. A refused key (401/403), a wrong URL (404) or an endpoint still down after the retries raise
TeacherUnavailable (the run stops, the rerun asks again); another 4xx raises RequestRefused (this request only).
"""
import base64
import io
import json
import os
import time
import urllib.error
import urllib.request

from PIL import Image

from pipeline.image_facts import overlay_view
from pipeline.quality_gate import STEP_RANGE


SYSTEM_PROMPT = """You are a teacher that writes supervision data for training a medical visual \
reasoning model. For each image and question you produce a concise final answer and a short \
step-by-step reasoning chain.
Teacher-only information: the image you see has the target drawn as a semi-transparent red layer with a \
yellow edge, and you are told the target's identity. Use both only to locate the target correctly. Write \
as if you were a student who sees only the original, unannotated image.
Never mention or imply hidden guidance, special markings, annotations, masks, overlays, colored layers, \
highlighted areas, segmentation maps, ROI, labels, ground truth, metadata or extra visual cues, and never \
suggest that the target identity was given to you.
Base every statement on visible evidence: location, shape, boundary, extent, density or signal \
intensity, texture and relations to nearby structures. You may name the given target, but do not add \
unsupported diagnoses, malignancy or benignity, severity, prognosis or treatment. For a normal organ do \
not describe lesions, masses, tumors or other pathology.
Spatial wording: image space only (left, right, center, upper and lower parts of the image). Never use \
patient-left, patient-right, anatomical left or anatomical right.
Output strict JSON with exactly two fields, "final_answer" (a string) and "reasoning_chain" (a list of \
strings, one per step). No markdown, no code fences, no other text."""

GUIDANCE = {
    "yesno": "Give direct visual evidence for the yes/no answer.",
    "identify": "Justify the identification from the visible appearance and context.",
    "location_choice": "Answer with a complete sentence naming the image region, not a bare word.",
    "location": "Step 1 finds the target; step 2 gives its image-space position relative to nearby anatomy.",
    "describe": "Cover appearance, shape, boundary, extent and other visible characteristics.",
    "reasoning": "Analyze location, morphology, visual contrast and relations to nearby structures.",
}
EXAMPLE = {"final_answer": "The liver is in the left part of the image.",
           "reasoning_chain": ["A large homogeneous soft-tissue structure fills the left part of the image.",
                               "Its smooth outline and size match the liver."]}


def user_prompt(case, sample, strict):
    qtype, (lo, hi) = sample["question_type"], STEP_RANGE[sample["question_type"]]
    example = dict(EXAMPLE, reasoning_chain=EXAMPLE["reasoning_chain"][:hi])
    lines = [f"Target (teacher-only): {sample['target']}", f"Target type: {sample['target_type']}",
             f"Modality: {case['modality']}", f"Question type: {qtype}",
             f"Student-visible question: {sample['question']}"]
    if qtype == "yesno":
        lines.append("Teacher-only fact: the correct answer is " +
                     ("No; the asked target is absent and the structure drawn in red is something else."
                      if sample["negative"] else "Yes."))
    steps = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
    lines += [f"Guidance for {qtype}: write {steps} reasoning step(s). {GUIDANCE[qtype]}",
              f"Example of the output style: {json.dumps(example)}"]
    if strict:  # §A.3 retry: name every violation and ask for a fresh answer
        lines += ["STRICT RULES: your previous answer was rejected because:", *(f"- {r}" for r in strict),
                  "Regenerate the answer from scratch, obey every rule above, and output only the "
                  "JSON object."]
    return "\n".join(lines)


class TeacherUnavailable(Exception):
    """The run cannot go on (the key is refused, the URL is wrong, the endpoint is down after the retries):
    not a decision about the sample, so the run stops and the rerun asks again."""


class RequestRefused(Exception):
    """The endpoint refused this one request (HTTP 400, 413, 422, ...): a reason to retry, then reject."""


def endpoint(args):
    return args.base_url.rstrip("/") + "/chat/completions"


def openai_teacher(case, sample, facts, strict, args):
    """One chat-completions call with the overlay as a base64 data URL; retries 429/5xx/network errors
    with exponential backoff, at most --http-retries times. 401/403/404 and an endpoint still down after
    the retries raise TeacherUnavailable; another 4xx raises RequestRefused."""
    buf = io.BytesIO()
    Image.fromarray(overlay_view(case["image"], case["mask"])).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = json.dumps({"model": args.teacher_model, "messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": user_prompt(case, sample, strict)},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    headers = {"Content-Type": "application/json",
               "Authorization": "Bearer " + os.environ.get(args.api_key_env, "")}  # never logged
    error = "no attempt"
    for attempt in range(args.http_retries + 1):
        if attempt:
            time.sleep(min(args.backoff_max, args.backoff_base * 2 ** (attempt - 1)))
        request = urllib.request.Request(endpoint(args), body, headers)
        try:
            with urllib.request.urlopen(request, timeout=args.timeout) as response:
                reply = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code in (401, 403):  # asking again, or with the next sample, will not help
                raise TeacherUnavailable(f"the teacher at {endpoint(args)} refused the key in "
                                         f"${args.api_key_env} ({error}): check the key") from None
            if e.code == 404:
                raise TeacherUnavailable(f"the teacher at {endpoint(args)} answered {error}: check --base-url "
                                         f"and --teacher-model {args.teacher_model}") from None
            if e.code != 429 and e.code < 500:  # this request only (too large, refused content, ...)
                detail = " ".join(e.read(300).decode("utf-8", "replace").split())
                raise RequestRefused(f"http: the endpoint answered {error} ({detail})") from None
            continue
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timeout, unknown host
            error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            continue
        try:
            return json.loads(reply)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return reply  # not chat-completions JSON: the gate rejects it as malformed
    raise TeacherUnavailable(f"the teacher at {endpoint(args)} is unreachable after {args.http_retries} "
                             f"retries (last: {error})")
