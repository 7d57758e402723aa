"""The embedded mini base: a small English-dominant Llama that knows some Chinese.

It stands in for Llama 2 7B where no weights can be downloaded. Like Llama 2 it has a byte-fallback
SentencePiece BPE tokenizer made of English pieces plus a few hundred frequent Han characters, and it
is pre-trained on mostly English text with a minority of Traditional Chinese (models/mini-base/README.md:
a base that saw Chinese only as bytes leaves nothing for the init strategies to transfer).
``tokenizer="byte_level"`` builds the stand-in for Llama 3 / Qwen 2.5 instead (models/mini-base-bbpe): the same
model and training with a byte-level BPE tokenizer laid out as Llama 3's.

Read top to bottom: tokenizer -> model config -> packed batches -> training loop -> save.
``build_mini_base`` runs them all. Everything is seeded and single-process, so the same torch
version and thread count rebuild the same ``model.safetensors`` bytes.
"""

from __future__ import annotations

import copy
import io
import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from bailong.tokenization.byte_level import BYTES, token_bytes, whole_text

BOS_ID, EOS_ID = 1, 2  # the SentencePiece layout's (Llama 2); the byte-level layout's come after its vocabulary
TOKENIZER_KINDS = ("sentencepiece", "byte_level")
# Llama 3's tokenizer.json: its pre-tokenizer pattern (English contractions, letters, digits in runs of 1-3, ...),
# then ByteLevel without its own regex; BOS/EOS are special tokens after the vocabulary
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
BYTE_LEVEL_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>")


@dataclass
class MiniBaseConfig:
    """Knobs of the mini base; the defaults are the shipped model's."""

    seed: int = 0
    threads: int = 2  # bit-for-bit rebuilds need the same thread count (and torch version)
    # tokenizer: vocab_size counts everything (sentencepiece: 3 specials + 256 bytes + English BPE + added CJK;
    # byte_level: 256 bytes + English merges + the merges spelling the CJK characters + 2 specials)
    tokenizer: str = "sentencepiece"
    vocab_size: int = 5000
    han_pieces: int = 600  # Llama 2's 32,000 pieces hold about 700 Han characters
    cjk_punct_pieces: int = 16  # frequent fullwidth punctuation (，。「」...), also in Llama 2's vocab
    # model (multiples of 32: the bitsandbytes CPU 4-bit kernel asserts otherwise)
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 1024
    # training
    tc_share: float = 1 / 3  # share of each batch's rows (= tokens) drawn from Traditional Chinese
    seq_len: int = 512
    batch_size: int = 12
    steps: int = 1400
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16_autocast: bool = True  # fastest on CPUs with AVX512-BF16 (measured on this project's build machines)
    log_every: int = 10
    eval_every: int = 100  # loss on a few fixed held-out rows per language, for the log only

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"tokenizer={self.tokenizer!r}: expected one of {', '.join(TOKENIZER_KINDS)}")

    @property
    def tc_rows(self) -> int:
        return round(self.batch_size * self.tc_share)


# ---------------------------------------------------------------- tokenizer


def is_han(ch: str) -> bool:
    """CJK unified ideographs (basic block, extension A, compatibility, extensions B and later)."""
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x3FFFF


def is_cjk_punct(ch: str) -> bool:
    """CJK symbols and punctuation, and the fullwidth forms (，！：？（）)."""
    cp = ord(ch)
    return 0x3000 <= cp <= 0x303F or 0xFF00 <= cp <= 0xFFEF


def most_frequent_chars(texts: Sequence[str], keep: Callable[[str], bool], k: int) -> list[str]:
    """The k most frequent characters passing ``keep``; ties broken by code point, so runs agree."""
    counts = Counter(ch for t in texts for ch in t if keep(ch))
    if len(counts) < k:
        raise ValueError(f"asked for {k} characters but the text holds only {len(counts)} distinct ones")
    return [ch for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _sentences(texts: Sequence[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(en_texts: Sequence[str], tc_texts: Sequence[str], cfg: MiniBaseConfig) -> bytes:
    """Serialized SentencePiece model: Llama-2-style English BPE, then the frequent CJK characters.

    The BPE is trained on English only, so its merges are English; the CJK characters are appended
    as single-character NORMAL pieces with scores below every base piece, the way SentencePiece
    itself ranks character pieces. Single characters are never merge results, so their scores do
    not change how English is split. Chinese outside them falls back to UTF-8 bytes, as in Llama 2.
    """
    added = most_frequent_chars(tc_texts, is_han, cfg.han_pieces) + most_frequent_chars(
        tc_texts, is_cjk_punct, cfg.cjk_punct_pieces
    )
    english_vocab = cfg.vocab_size - len(added)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(en_texts),
        model_writer=buf,
        # Llama 2's trainer_spec where it matters (data/tokenizers/mistral-v1.model has the same)
        model_type="bpe",
        vocab_size=english_vocab,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        # determinism: one thread, every sentence, no sampling
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    present = {p.piece for p in proto.pieces}
    lowest = min(p.score for p in proto.pieces if p.type == sp_pb2.ModelProto.SentencePiece.NORMAL)
    for ch in added:
        if ch in present:  # SentencePiece rejects a model with a duplicate piece
            raise ValueError(f"{ch!r} is already a piece of the English BPE; remove it from the English text")
        lowest -= 1.0
        proto.pieces.add(piece=ch, score=lowest, type=sp_pb2.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    if len(proto.pieces) != cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(proto.pieces)} pieces, expected {cfg.vocab_size}")
    return proto.SerializeToString()


def tokenizer_layout(sp: spm.SentencePieceProcessor) -> dict:
    """Counts for the model card, and the Llama layout check (ids 0-2 special, 3-258 bytes)."""
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if pieces[:3] != ["<unk>", "<s>", "</s>"] or pieces[3:259] != [f"<0x{b:02X}>" for b in range(256)]:
        raise ValueError("tokenizer is not laid out as Llama's (<unk>, <s>, </s>, <0x00>..<0xFF>)")
    return {
        "pieces": len(pieces),
        "byte_pieces": sum(sp.is_byte(i) for i in range(len(pieces))),
        "han_pieces": sum(any(is_han(c) for c in p) for p in pieces),
        "cjk_punct_pieces": sum(len(p) == 1 and is_cjk_punct(p) for p in pieces),
    }


def cjk_merges(chars: Sequence[str], known: set[str]) -> list[tuple[str, str]]:
    """The merges that build each of ``chars`` from its UTF-8 bytes, left to right (byte-level tokens), skipping
    the tokens already ``known``: ``中`` = E4 B8 AD takes ``(E4, B8)`` then ``(E4B8, AD)``, as a byte-level BPE
    trained on Chinese builds its characters (the two-byte prefixes are tokens too, shared by many characters)."""
    alphabet = {b: ch for ch, b in BYTES.items()}
    merges: list[tuple[str, str]] = []
    known = set(known)
    for char in chars:
        pieces = [alphabet[b] for b in char.encode("utf-8")]
        token = pieces[0]
        for piece in pieces[1:]:
            if token + piece not in known:
                merges.append((token, piece))
                known.add(token + piece)
            token += piece
    return merges


def train_byte_level_tokenizer(en_texts: Sequence[str], tc_texts: Sequence[str], cfg: MiniBaseConfig) -> Tokenizer:
    """A byte-level BPE laid out as Llama 3's: its pre-tokenizer pattern then ByteLevel, ``ignore_merges``, the 256
    byte tokens and English merges, then the merges spelling the most frequent CJK characters of the TC text (the
    same characters as the SentencePiece layout's Han and punctuation pieces), then BOS and EOS as special tokens.

    The English merges are learned on English only, so they are English; the CJK merges rank after them and
    join only bytes of those characters, so English splits as the English BPE alone would. Chinese outside those
    characters is spelled in byte tokens (what Llama 3 does with rare characters).
    """
    chars = most_frequent_chars(tc_texts, is_han, cfg.han_pieces) + most_frequent_chars(
        tc_texts, is_cjk_punct, cfg.cjk_punct_pieces
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    cjk = cjk_merges(chars, set())
    english = Tokenizer(models.BPE())
    english.pre_tokenizer = pre_tokenizer
    english.train_from_iterator(
        _sentences(en_texts),
        trainers.BpeTrainer(
            vocab_size=cfg.vocab_size - len(cjk) - len(BYTE_LEVEL_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    spec = json.loads(english.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = spec["model"]["merges"]
    for left, right in cjk_merges(chars, set(vocab)):
        vocab[left + right] = len(vocab)
        merges.append([left, right])
    spec["model"]["ignore_merges"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(BYTE_LEVEL_SPECIALS))
    bos = BYTE_LEVEL_SPECIALS[0]
    # Llama 3 adds BOS, not EOS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected {cfg.vocab_size}")
    return tokenizer


def byte_level_layout(tokenizer: Tokenizer) -> dict:
    """Counts for the model card, and the Llama 3 layout check (the 256 byte tokens first, specials last)."""
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    if sorted(token_bytes(t) for t in tokens[:256]) != [bytes([b]) for b in range(256)]:
        raise ValueError("tokenizer is not laid out as Llama 3's (the 256 byte tokens first)")
    specials = [tokenizer.id_to_token(len(tokens) + i) for i in range(len(BYTE_LEVEL_SPECIALS))]
    if specials != list(BYTE_LEVEL_SPECIALS):
        raise ValueError(
            f"tokenizer's special tokens after the vocabulary are {specials}, expected {BYTE_LEVEL_SPECIALS}"
        )
    texts = [whole_text(t) for t in tokens]
    return {
        "tokens": len(tokens) + len(specials),
        "byte_tokens": 256,
        "merges": len(tokens) - 256,
        "han_tokens": sum(len(t) == 1 and is_han(t) for t in texts),
        "cjk_punct_tokens": sum(len(t) == 1 and is_cjk_punct(t) for t in texts),
        "partial_character_tokens": sum(not t for t in texts),  # bytes that are not whole UTF-8 characters
        "special_tokens": len(specials),
    }


# ---------------------------------------------------------------- model


def llama_config(cfg: MiniBaseConfig, bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,  # as Llama 2
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


# ---------------------------------------------------------------- data


def encode_documents(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str]) -> list[np.ndarray]:
    """Each document as BOS + ids + EOS, encoded by the shipped transformers tokenizer.

    The transformers tokenizer, not SentencePiece, because it is what the rest of bailong feeds the
    model with; the two differ only on text that starts with whitespace (transformers' Metaspace
    does not add the dummy-prefix space there).
    """
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [np.array([bos, *doc, eos], dtype=np.int64) for doc in ids]


class PackedRows:
    """Endless rows of seq_len + 1 tokens cut from the documents packed end to end.

    Each epoch packs the documents in a fresh seeded order, so the data order is a function of
    the seed. Rows do not respect document boundaries (as in Llama pre-training); BOS/EOS mark them.
    """

    def __init__(self, docs: list[np.ndarray], seq_len: int, seed: int):
        if not docs:
            raise ValueError("no documents to pack")
        self.docs, self.seq_len = docs, seq_len
        self.rng = np.random.default_rng(seed)
        self.epoch, self.tokens_served = 0, 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        order = self.rng.permutation(len(self.docs))
        self.stream = np.concatenate([self.docs[i] for i in order])
        if len(self.stream) < self.seq_len + 1:
            raise ValueError(f"corpus holds {len(self.stream)} tokens, fewer than one row of {self.seq_len + 1}")
        self.pos = 0
        self.epoch += 1

    def take(self, n: int) -> np.ndarray:
        rows = []
        for _ in range(n):
            if self.pos + self.seq_len + 1 > len(self.stream):
                self._new_epoch()
            rows.append(self.stream[self.pos : self.pos + self.seq_len + 1])
            self.pos += self.seq_len  # the last token of a row is the first input of the next
            self.tokens_served += self.seq_len
        return np.stack(rows)


# ---------------------------------------------------------------- training


def lr_at(step: int, cfg: MiniBaseConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _loss(model: LlamaForCausalLM, rows: torch.Tensor, cfg: MiniBaseConfig) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


def train(
    model: LlamaForCausalLM,
    en: PackedRows,
    tc: PackedRows | None,
    cfg: MiniBaseConfig,
    log,
    held_out: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Plain AdamW pre-training; every batch holds exactly cfg.tc_rows Chinese rows."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on norm gains (Llama, nanoGPT)
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    tc_rows = cfg.tc_rows if tc is not None else 0
    model.train()
    start = last = time.perf_counter()
    last_step = 0
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        parts = [en.take(cfg.batch_size - tc_rows)] + ([tc.take(tc_rows)] if tc_rows else [])
        rows = torch.from_numpy(np.concatenate(parts))
        loss = _loss(model, rows, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            now = time.perf_counter()
            tok_s = (step + 1 - last_step) * cfg.batch_size * cfg.seq_len / (now - last)
            log(
                f"step {step + 1}/{cfg.steps} loss {loss.item():.4f} grad_norm {grad_norm.item():.3f} "
                f"lr {lr_at(step, cfg):.2e} tok/s {tok_s:.0f} elapsed {now - start:.0f}s"
            )
            last, last_step = now, step + 1
        if held_out and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            with torch.no_grad():
                parts = [f"{name} {_loss(model, r, cfg).item() / math.log(2):.3f}" for name, r in held_out.items()]
            model.train()
            log(f"step {step + 1} held-out bits/token: " + ", ".join(parts))
    wall = time.perf_counter() - start
    return {
        "steps": cfg.steps,
        "wall_time_s": round(wall, 1),
        "tokens": {"en": en.tokens_served, "tc": tc.tokens_served if tc is not None else 0},
        "epochs": {"en": en.epoch, "tc": tc.epoch if tc is not None else 0},
    }


# ---------------------------------------------------------------- build + save


# what save_pretrained writes for a tokenizer (a stale one would shadow the new tokenizer.model)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def save_tokenizer(sp_model: bytes, out_dir: Path) -> PreTrainedTokenizerBase:
    """tokenizer.model (read by the tokenizer-extension code) plus the files AutoTokenizer loads, all made from
    ``sp_model``: converted in an empty directory, since ``from_pretrained`` prefers a tokenizer.json it finds
    (rebuilding over an older base would otherwise keep the old vocabulary beside the new tokenizer.model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sp_model)
        # LlamaTokenizer converts tokenizer.model itself (LlamaTokenizerFast(vocab_file=...) silently returns a
        # 3-token tokenizer in transformers 5); transformers 5 adds no BOS unless told, Llama 2's tokenizer does.
        tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True, add_eos_token=False)
        for stale in TOKENIZER_FILES:
            (out_dir / stale).unlink(missing_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.model").write_bytes(sp_model)
    return AutoTokenizer.from_pretrained(str(out_dir))


def save_byte_level_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> PreTrainedTokenizerBase:
    """tokenizer.json and tokenizer_config.json as Llama 3 ships them (no tokenizer.model: a byte-level base has
    none), loaded back by AutoTokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*TOKENIZER_FILES, "tokenizer.model"):
        (out_dir / stale).unlink(missing_ok=True)
    bos, eos = BYTE_LEVEL_SPECIALS
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos).save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def save_model(model: LlamaForCausalLM, out_dir: Path) -> None:
    """Weights stored in bf16 (a few MB); config.dtype float32 so from_pretrained upcasts exactly."""
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(out_dir))
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"  # compute dtype on CPU; bf16 -> fp32 is exact
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_mini_base(
    cfg: MiniBaseConfig,
    en_docs: Sequence[str],
    tc_docs: Sequence[str],
    out_dir: str | Path,
    log_path: str | Path | None = None,
    en_held_out: Sequence[str] = (),
    tc_held_out: Sequence[str] = (),
) -> dict:
    """Train tokenizer and model from the *training* documents, save to out_dir, return stats.

    tc_share = 0 gives the English-only reference; the tokenizer still takes its
    CJK characters from tc_docs so that both bases share one vocabulary. The held-out documents
    only feed the progress log.
    """
    out_dir = Path(out_dir)
    log_file = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115  closed at the end

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    torch.set_num_threads(cfg.threads)
    log(f"config {json.dumps(asdict(cfg))}")
    if cfg.tokenizer == "byte_level":
        bpe = train_byte_level_tokenizer(en_docs, tc_docs, cfg)
        layout = byte_level_layout(bpe)
        tokenizer = save_byte_level_tokenizer(bpe, out_dir)
    else:
        sp_model = train_tokenizer(en_docs, tc_docs, cfg)
        layout = tokenizer_layout(spm.SentencePieceProcessor(model_proto=sp_model))
        tokenizer = save_tokenizer(sp_model, out_dir)
    log(f"tokenizer {layout}")

    en = PackedRows(encode_documents(tokenizer, en_docs), cfg.seq_len, seed=cfg.seed)
    tc = PackedRows(encode_documents(tokenizer, tc_docs), cfg.seq_len, seed=cfg.seed + 1) if cfg.tc_share > 0 else None
    held_out = {}
    for name, docs in (("en", en_held_out), ("tc", tc_held_out)):
        if docs:
            rows = PackedRows(encode_documents(tokenizer, docs), cfg.seq_len, seed=0).take(4)
            held_out[name] = torch.from_numpy(rows)
    torch.manual_seed(cfg.seed)  # the weight init is the only torch randomness
    model = LlamaForCausalLM(llama_config(cfg, tokenizer.bos_token_id, tokenizer.eos_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model parameters {n_params:,}")
    stats = train(model, en, tc, cfg, log, held_out)
    save_model(model, out_dir)
    log(f"saved {out_dir} ({stats['wall_time_s']} s)")
    if log_file:
        log_file.close()
    return {"config": asdict(cfg), "tokenizer": layout, "parameters": n_params, "torch": torch.__version__, **stats}
