"""GGUF for llama.cpp, made by llama.cpp's own converter (``convert_hf_to_gguf.py``) from an export directory.

    python -m bailong.export outputs/sft/runs/<run> exports/bailong-mini --gguf [--gguf-type f16]
    python -m bailong.gguf exports/bailong-mini exports/bailong-mini-q8_0.gguf --type q8_0   # an existing export

llama.cpp's converter is the only one that keeps up with llama.cpp's file format, so bailong runs it rather
than writing GGUF itself. It is not in the ``llama-cpp-python`` wheel (the ``gguf`` extra), only in its source
distribution, which vendors llama.cpp: the converter used is, in this order, the one in ``--llama-cpp DIR``,
in ``$LLAMA_CPP_DIR`` (a llama.cpp checkout), or the one of the installed llama-cpp-python's own version,
fetched once from PyPI with ``pip download`` (pip checks the file's hash against the index) and unpacked into
``<cache_dir>/llama_cpp/<version>/`` — the converter then matches the llama.cpp library that loads the file.

The converter runs in a subprocess with this Python and ``HF_HUB_OFFLINE=1``. Some of its code paths load the
tokenizer with ``trust_remote_code=True``, so it is refused an export directory that carries Python code or
an ``auto_map`` (a base with its own modelling code): nothing a downloaded file says may turn on remote code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from bailong.cache import atomic_dir, computed_once, default_cache_dir
from bailong.tokenization import SP_MODEL_FILE
from bailong.tokenization.byte_level import is_byte_level_bpe

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's --outtype values that need no imatrix
CONVERTER = "convert_hf_to_gguf.py"
# what the converter imports beside itself: its model classes and the gguf-py package of the same commit
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py", "LICENSE")
SDIST_ROOT = "vendor/llama.cpp"  # where llama-cpp-python's source distribution keeps llama.cpp
LLAMA_CPP_DIR_ENV = "LLAMA_CPP_DIR"


class GGUFError(RuntimeError):
    """The GGUF conversion cannot run or failed; the message says why and what to do."""


def installed_llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise GGUFError(
            "GGUF export needs llama.cpp's converter: install the gguf extra (pip install -e '.[gguf]', which "
            f"builds llama-cpp-python from source), or point --llama-cpp / ${LLAMA_CPP_DIR_ENV} at a llama.cpp "
            "checkout"
        ) from None


def fetch_converter(version: str, cache_dir: Path | None = None) -> Path:
    """llama.cpp's converter from llama-cpp-python ``version``'s source distribution, unpacked once into
    ``<cache_dir>/llama_cpp/<version>`` (concurrent callers wait for the first)."""
    entry = Path(cache_dir or default_cache_dir()) / "llama_cpp" / version
    with computed_once(entry):
        if (entry / CONVERTER).is_file():
            return entry / CONVERTER
        log.info("fetching llama.cpp's GGUF converter: llama-cpp-python==%s's source distribution from PyPI", version)
        with tempfile.TemporaryDirectory() as download, atomic_dir(entry) as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", download]
            proc = subprocess.run([*pip, f"llama-cpp-python=={version}"], capture_output=True, text=True)
            sdists = list(Path(download).glob("llama_cpp_python-*.tar.gz"))
            if proc.returncode != 0 or len(sdists) != 1:
                raise GGUFError(
                    f"could not download llama-cpp-python=={version}'s source distribution (pip: "
                    f"{proc.stderr.strip()[-500:]}); use --llama-cpp DIR with a llama.cpp checkout instead"
                )
            extract_converter(sdists[0], tmp)
    return entry / CONVERTER


def extract_converter(sdist: Path, out: Path) -> None:
    """Unpack the converter's parts (``CONVERTER_PARTS``) from a llama-cpp-python source distribution."""
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/{SDIST_ROOT}/"
        members = []
        for member in tar.getmembers():
            rel = member.name[len(prefix) :] if member.name.startswith(prefix) else None
            if rel and rel.split("/")[0] in CONVERTER_PARTS and (member.isfile() or member.isdir()):
                member.name = rel
                members.append(member)
        if not any(m.name == CONVERTER for m in members):
            raise GGUFError(f"{sdist}: no {SDIST_ROOT}/{CONVERTER} in this source distribution")
        tar.extractall(out, members=members, filter="data")  # "data": no links out, no absolute paths


def converter_script(llama_cpp_dir: str | os.PathLike | None = None, cache_dir: Path | None = None) -> Path:
    """The converter to run: ``llama_cpp_dir``, else ``$LLAMA_CPP_DIR``, else the installed llama-cpp-python's."""
    chosen = llama_cpp_dir or os.environ.get(LLAMA_CPP_DIR_ENV)
    if chosen:
        script = Path(chosen) / CONVERTER
        if not script.is_file():
            where = "--llama-cpp" if llama_cpp_dir else f"${LLAMA_CPP_DIR_ENV}"
            raise GGUFError(f"{where}={chosen}: no {CONVERTER} there (expected a llama.cpp checkout)")
        return script
    return fetch_converter(installed_llama_cpp_version(), cache_dir)


def check_no_custom_code(model_dir: Path) -> None:
    """Refuse a model directory with its own Python code (the converter may load it with trust_remote_code)."""
    code = sorted(p.name for p in model_dir.glob("*.py"))
    config = json.loads((model_dir / "config.json").read_text())
    if code or "auto_map" in config:
        found = ", ".join(code) if code else "config.json's auto_map"
        raise GGUFError(
            f"{model_dir}: carries its own modelling code ({found}); llama.cpp's converter may run it "
            "(trust_remote_code=True), so bailong does not convert this directory"
        )


def needs_sentencepiece_model(model_dir: Path) -> bool:
    """Whether llama.cpp's converter needs ``tokenizer.model`` for this directory: yes for a SentencePiece-style
    (Llama 2) vocabulary; a byte-level BPE one (Llama 3, Qwen 2.5) it reads from ``tokenizer.json``."""
    spec_file = model_dir / "tokenizer.json"
    return not (spec_file.is_file() and is_byte_level_bpe(json.loads(spec_file.read_text(encoding="utf-8"))))


def convert_to_gguf(
    model_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    gguf_type: str = "f16",
    *,
    llama_cpp_dir: str | os.PathLike | None = None,
    cache_dir: Path | None = None,
    pre_tokenizer: str | None = None,
) -> Path:
    """Convert a Hugging Face model directory (a bailong export) to ``out_file`` with llama.cpp's converter.

    An extended byte-level vocabulary keeps its base's pre-tokenizer name (``bailong/gguf_converter.py``: from the
    base's tokens, ``num_base`` in ``bailong_export.json``); ``pre_tokenizer`` names it for a base llama.cpp does not
    list (``llama-bpe`` for Llama 3's pattern, ``qwen2`` for Qwen 2's)."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    check_no_custom_code(model_dir)
    if needs_sentencepiece_model(model_dir) and not (model_dir / SP_MODEL_FILE).is_file():
        raise GGUFError(
            f"{model_dir}: no tokenizer.model, which llama.cpp needs for a Llama vocabulary (an export of a run "
            "saved before bailong carried it has none): copy the run's extended tokenizer's tokenizer.model "
            "(<cache_dir>/tokenizers/<key>/) into the directory"
        )
    script = converter_script(llama_cpp_dir, cache_dir)
    # no hub access; and the converter's own gguf-py (of its commit), not whatever gguf package is installed
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    record = model_dir / "bailong_export.json"
    num_base = json.loads(record.read_text()).get("num_base") if record.is_file() else None
    command = [sys.executable, "-m", "bailong.gguf_converter", str(script)]
    command += [
        *(["--num-base", str(num_base)] if num_base else []),
        *(["--pre", pre_tokenizer] if pre_tokenizer else []),
    ]
    command += ["--", str(model_dir), "--outfile", str(out_file), "--outtype", gguf_type]
    log.info("converting %s to %s (%s)", model_dir, out_file, gguf_type)
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    failed = proc.returncode != 0 or not out_file.is_file()
    if failed and "BPE pre-tokenizer was not recognized" in proc.stderr:
        raise GGUFError(
            f"{model_dir}: llama.cpp does not know this base's BPE pre-tokenizer; name it with --pre (python -m "
            "bailong.gguf) or --gguf-pre (python -m bailong.export): llama-bpe for Llama 3's pattern (the byte-level "
            "mini base's too), qwen2 for Qwen 2's"
        )
    if failed:
        raise GGUFError(f"llama.cpp's converter failed on {model_dir} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out_file


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bailong.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a Hugging Face model directory, e.g. a bailong export")
    parser.add_argument("out_file", help="the .gguf file to write")
    parser.add_argument("--type", default="f16", choices=GGUF_TYPES, help="GGUF tensor type (default: f16)")
    parser.add_argument("--llama-cpp", metavar="DIR", help=f"llama.cpp checkout (default: ${LLAMA_CPP_DIR_ENV}, ...)")
    parser.add_argument("--pre", metavar="NAME", help="the BPE pre-tokenizer's llama.cpp name, if it does not know it")
    args = parser.parse_args(argv)
    print(
        convert_to_gguf(args.model_dir, args.out_file, args.type, llama_cpp_dir=args.llama_cpp, pre_tokenizer=args.pre)
    )


__all__ = ["GGUF_TYPES", "GGUFError", "convert_to_gguf", "converter_script", "extract_converter", "fetch_converter"]

if __name__ == "__main__":
    main()
