"""The tiny checkpoint's tokenizer: a Qwen-style byte-level BPE trained here, on text generated here.

Nothing is downloaded. The corpus is generated from fixed word lists by a fixed-seed RNG, so the trained
tokenizer is the same on every machine and for every weight seed. Special tokens are appended after the
learned vocabulary, as in Qwen's tokenizer, in the order of `SPECIAL_TOKENS`.
"""

import json
import pathlib
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from deploy.tiny_model.chat_template import DEFAULT_SYSTEM_MESSAGE

# Learned tokens (the 256 bytes + merges), before the special tokens are appended.
LEARNED_VOCAB_SIZE = 3000

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
# transformers' InternVLProcessor requires a video token; vLLM's original-layout InternVL code does not use it.
VIDEO_TOKEN = "<video>"
# vLLM's InternVL serves videos only when the tokenizer holds the Qwen frame-context token (each frame's
# 256 embedding rows take its place); appended last, so the ids of the tokens above stay as they were.
CONTEXT_VIDEO_TOKEN = "<|video_pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN,
                  START_IMAGE_TOKEN, END_IMAGE_TOKEN, CONTEXT_IMAGE_TOKEN, VIDEO_TOKEN, CONTEXT_VIDEO_TOKEN)

# Qwen2/Qwen3's pre-tokenization pattern: words, single digits, punctuation runs, newlines, spaces.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = ("""the of and to in is was that for it with as on be at by this had not are but from have they
you which one were all there when can been has more would her their will each about how up out them
then she many some so these would other into two him time like could see more way look first water
than call who now find long down day did get come made may part over new sound take only little work
know place year live back give most very after thing our just name good sentence man think say great
where help through much before line right too mean old any same tell boy follow came want show also
around form three small set put end does another well large must big even such because turn here why
ask went men read need land different home move try kind hand picture again change off play spell air
away animal house point page letter mother answer found study still learn should world high every near
add food between own below country plant last school father keep tree never start city earth eye light
thought head under story saw left few while along might close something seem next hard open example
begin life always those both paper together got group often run important until children side feet car
mile night walk white sea began grow took river four carry state once book hear stop without second
later miss idea enough eat face watch far really almost let above girl sometimes mountain cut young
talk soon list song being leave family color image chart document table window street morning""").split()
_SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "sa", "vel", "quin", "dra", "po", "nix", "ul", "ber", "gan",
              "shi", "tel", "ra", "mon", "zu", "fel", "ar", "ost", "len", "cra", "vi", "dor", "pe", "ith")
_PUNCTUATION = (".", ".", ".", "?", "!", ",", ";", ":")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.5:  # a made-up name: many distinct words, so BPE learns sub-word merges
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        words.insert(rng.randrange(len(words)), name.capitalize())
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    return " ".join(words).capitalize() + rng.choice(_PUNCTUATION)


def generate_corpus(num_lines: int = 20000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    # The chat template's fixed strings, so that every prompt's frame is a handful of tokens.
    lines = [DEFAULT_SYSTEM_MESSAGE, "system", "user", "assistant"] * 50
    lines += ["".join(_sentence(rng) + (" " if rng.random() < 0.7 else "\n") for _ in range(rng.randint(1, 4)))
              for _ in range(num_lines)]
    return lines


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LEARNED_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(generate_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def tokenizer_config(chat_template: str) -> dict:
    """tokenizer_config.json for a transformers fast tokenizer, with the InternVL image tokens named."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 40960,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        # Named so that transformers' InternVLProcessor finds them (`tokenizer.context_image_token`, ...).
        "extra_special_tokens": {
            "start_image_token": START_IMAGE_TOKEN,
            "end_image_token": END_IMAGE_TOKEN,
            "context_image_token": CONTEXT_IMAGE_TOKEN,
            "video_token": VIDEO_TOKEN,
        },
        "chat_template": chat_template,
    }


def write_tokenizer(out_dir: pathlib.Path, chat_template: str) -> dict[str, int]:
    """Writes tokenizer.json and tokenizer_config.json; returns the special tokens' ids."""
    tokenizer = train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(chat_template)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
