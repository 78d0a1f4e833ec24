"""
Tiny models of the real classes, for the tests and the demo (they are fixtures, not the method).

make_tiny writes random-init Qwen3-VL, Qwen3 and SigLIP models (fixed seed) with save_pretrained; they load
through model.load_backbone / load_decoder / load_encoder exactly like the real checkpoints. The tokenizer
is a small byte-level BPE built offline with the `tokenizers` library, with Qwen's special tokens and chat
format. real_configs gives the paper's model shapes for random-weight checks at real size (bench/).

    python embedded/tiny.py runs/tiny              # -> runs/tiny/{backbone,decoder,encoder}/
    python embedded/tiny.py runs/tiny_words --words order   # the order question's words whole (demo/walk.py --words)
"""
import argparse
import os

import torch
from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3VLConfig, Qwen3VLForConditionalGeneration, SiglipImageProcessorPil,
                          SiglipVisionConfig, SiglipVisionModel)


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen's chat format for one user turn with an image, as Qwen3-VL-Instruct's own template renders it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_CORPUS = """the image shows a bright dark round oval elongated irregular smooth sharp blurred boundary
target organ lesion tumor vessel tissue cell retina liver lung kidney spleen heart brain pancreas
prostate colon polyp nodule mass cyst skin fundus optic disc ultrasound dermoscopy x-ray ct mri
left right center upper lower middle part of is in located where what which describe analyze
yes no visible present absent appears compared with surrounding brighter darker than region
structure shape size small large extent its edge edges well defined uniform intensity texture
question answer step reasoning finding image-space area occupies about percent lies near
""".split()
# The order question's words (embedded/phantom.py's order grids: the stated rule, the chains, the options), kept whole
# by `make_tiny(words="order")`: TINY_CORPUS alone cuts them into pieces ('numbers' is n / u / m / b / er / s), which
# made the stated question 185 tokens and a chain step 60; with them 84 and 31 (docs/tuning-log.md, 2026-12-08).
ORDER_WORDS = """three numbers number stand order read lesions row by from after and or do so to this one two first last
end goes sends swap swaps leaves surroundings photograph options with 0 1 2 3 4 5 6 7 8 9
""".split()
WORDS = {"tiny": (TINY_CORPUS, 1024), "order": (TINY_CORPUS + ORDER_WORDS, 2048)}  # -> (seed words, vocabulary cap)


def make_tokenizer(seed_words=TINY_CORPUS, vocab_size=1024):
    """A byte-level BPE tokenizer built offline with `tokenizers`, with Qwen's special tokens. Every seed word becomes
    one token (with and without a leading space, and capitalised) when vocab_size leaves room for all its merges:
    TINY_CORPUS gives 911 entries under 1024, WORDS["order"] 1072 under 2048."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = list(seed_words) + [w.capitalize() for w in seed_words]
    tok.train_from_iterator([" ".join(words)] * 4 + [f" {w}" for w in words] * 8 + words * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def make_tiny(folder, hidden=64, layers=2, dec_hidden=64, dec_layers=2, enc_hidden=48, seed=0, patch=16,
              position_scale=1.0, words="tiny"):
    """Write tiny random-init models of the real classes (fixed seed) into folder/{backbone,decoder,
    encoder}. They load through load_backbone/load_decoder/load_encoder exactly like real checkpoints.
    position_scale multiplies the encoder's position embeddings after init (the same weights otherwise): at 3 its
    patch features say where a patch is about as loudly as what it shows (a stand-in whose features carry position,
    for the pointing game on grids of look-alike lesions: docs/tuning-log.md, 2026-12-07 fourth).
    words: the tokenizer's seed words, a key of WORDS ("order" also keeps the order question's words whole; the
    embedding and lm_head rows follow the vocabulary's size, so every weight differs from "tiny"'s)."""
    torch.manual_seed(seed)
    tok = make_tokenizer(*WORDS[words])
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 32  # M-RoPE splits head_dim/2 = 16 frequencies over (t, h, w) as 6/5/5
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
                         num_key_value_heads=max(1, hidden // head_dim // 2), head_dim=head_dim,
                         max_position_embeddings=4096, pad_token_id=ids["<|endoftext|>"],
                         # (chosen) init std 1/sqrt(hidden), not 0.02: a 64-wide frozen lm_head at 0.02 caps
                         # logits near +-1.3, so a tiny random backbone could never fit an answer.
                         initializer_range=hidden ** -0.5,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[6, 5, 5],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    out = os.path.join(folder, "backbone")
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    # Qwen3-VL's processor: 16-px patches, 2x2 merge => one LLM token per 32x32 pixels.
    Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                             min_pixels=(2 * patch) ** 2, max_pixels=512 * 512).save_pretrained(out)

    dcfg = Qwen3Config(vocab_size=len(tok), hidden_size=dec_hidden, intermediate_size=2 * dec_hidden,
                       num_hidden_layers=dec_layers, num_attention_heads=dec_hidden // head_dim,
                       num_key_value_heads=max(1, dec_hidden // head_dim // 2), head_dim=head_dim,
                       max_position_embeddings=1024, tie_word_embeddings=True,
                       initializer_range=dec_hidden ** -0.5, pad_token_id=ids["<|endoftext|>"],
                       eos_token_id=ids["<|im_end|>"])
    Qwen3ForCausalLM(dcfg).save_pretrained(os.path.join(folder, "decoder"))
    tok.save_pretrained(os.path.join(folder, "decoder"))

    # MedSigLIP analogue: 112 px, patch 14 => an 8x8 grid (the real one: 448 px, 32x32, d_v = 1152).
    ecfg = SiglipVisionConfig(image_size=112, patch_size=14, hidden_size=enc_hidden,
                              intermediate_size=2 * enc_hidden, num_hidden_layers=2, num_attention_heads=2)
    encoder = SiglipVisionModel(ecfg)
    with torch.no_grad():
        encoder.embeddings.position_embedding.weight.mul_(position_scale)
    encoder.save_pretrained(os.path.join(folder, "encoder"))
    SiglipImageProcessorPil(size={"height": 112, "width": 112}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                            do_pad=False).save_pretrained(os.path.join(folder, "encoder"))
    return folder


def real_configs(layers=None, dec_layers=None):
    """The paper's model shapes (§B.1), for random-weight checks: Qwen3-VL-8B (LLM 4096 x 36, ViT 1152 x 27,
    deepstack 8/16/24, M-RoPE sections 24/20/20), Qwen3-1.7B (2048 x 28) and SigLIP-448 (MedSigLIP's shape:
    1152 x 27, patch 14). `layers`/`dec_layers` shorten the two LLMs only. The tiny tokenizer stands in for
    Qwen's: its ids are < the real vocabulary.
    -> (backbone config, decoder config, encoder config, tokenizer)."""
    tok = make_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                         num_hidden_layers=layers or 36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=262144, pad_token_id=ids["<|endoftext|>"],
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    dcfg = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=dec_layers or 28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
                       pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    ecfg = SiglipVisionConfig(image_size=448, patch_size=14, hidden_size=1152, intermediate_size=4304,
                              num_hidden_layers=27, num_attention_heads=16)
    return cfg, dcfg, ecfg, tok


def main():
    ap = argparse.ArgumentParser(description="write tiny random-init backbone/decoder/encoder folders")
    ap.add_argument("folder", help="output folder, e.g. runs/tiny")
    ap.add_argument("--hidden", type=int, default=64, help="LLM hidden size of the tiny backbone")
    ap.add_argument("--layers", type=int, default=2, help="LLM layers of the tiny backbone")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    ap.add_argument("--position-scale", type=float, default=1.0,
                    help="the encoder's position embeddings times this (3: patch features that carry position)")
    ap.add_argument("--words", choices=list(WORDS), default="tiny",
                    help="the tokenizer's seed words: tiny, or order (the order question's words kept whole too)")
    args = ap.parse_args()
    make_tiny(args.folder, hidden=args.hidden, layers=args.layers, seed=args.seed, position_scale=args.position_scale,
              words=args.words)
    print(f"tiny models written to {args.folder}/{{backbone,decoder,encoder}}")


if __name__ == "__main__":
    main()
