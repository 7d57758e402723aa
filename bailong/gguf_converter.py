"""llama.cpp's ``convert_hf_to_gguf.py``, run so that an extended byte-level BPE vocabulary keeps its base's
pre-tokenizer name (``bailong.gguf`` runs this in the converter's subprocess).

The converter names a BPE pre-tokenizer (``tokenizer.ggml.pre``: how llama.cpp splits text before the merges) by
hashing the tokenizer's encoding of a fixed text, and refuses a hash it does not know. That text holds Chinese,
so an extended Llama 3 or Qwen tokenizer, whose new merges join those characters, hashes to nothing the converter
knows although its pre-tokenizer is exactly the base's. When the hash is unknown, the name is taken from the
base's own vocabulary: the tokens below ``num_base`` and the merges that build them (the extension only appends;
``bailong/tokenization/byte_level.py``), or given outright (``--pre``, for a base llama.cpp does not list, such as
the byte-level mini base, whose pattern is Llama 3's: ``llama-bpe``).

    python -m bailong.gguf_converter CONVERTER --num-base N [--pre NAME] -- MODEL_DIR --outfile F --outtype T
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any


def base_view(tokenizer: Any, num_base: int) -> Any:
    """``tokenizer`` without what extension appended: tokens with ids from ``num_base`` on and their merges (special
    tokens, pre-tokenizer and post-processor kept)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < num_base}

    def joined(merge) -> str:
        return merge.replace(" ", "", 1) if isinstance(merge, str) else merge[0] + merge[1]

    model["merges"] = [m for m in model["merges"] if joined(m) in model["vocab"]]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def patch_pre_tokenizer_name(converter: Any, num_base: int | None, pre: str | None) -> int:
    """Wrap every ``get_vocab_base_pre`` the converter's classes define; returns how many were wrapped."""
    seen, stack, patched = set(), [converter.ModelBase], 0
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        original = cls.__dict__.get("get_vocab_base_pre")
        if original is None:
            continue

        def named(self, tokenizer, _original=original):
            try:
                return _original(self, tokenizer)
            except NotImplementedError:
                if pre:
                    return pre
                if num_base is None:
                    raise
                return _original(self, base_view(tokenizer, num_base))

        cls.get_vocab_base_pre = named
        patched += 1
    return patched


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, converter_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m bailong.gguf_converter", description=__doc__.split("\n\n")[0])
    parser.add_argument("converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--num-base", type=int, help="the base vocabulary's size (bailong_export.json)")
    parser.add_argument("--pre", help="tokenizer.ggml.pre to write when the hash is unknown (e.g. llama-bpe)")
    args = parser.parse_args(ours)
    sys.path.insert(0, str(args.converter.parent))  # its own conversion/ package and gguf-py beside it
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", args.converter)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    if not patch_pre_tokenizer_name(converter, args.num_base, args.pre):
        raise SystemExit(f"{args.converter}: no get_vocab_base_pre to wrap (an unexpected llama.cpp version)")
    sys.argv = [str(args.converter), *converter_args]  # what the converter's own argument parser reads
    converter.main()


if __name__ == "__main__":
    main()
