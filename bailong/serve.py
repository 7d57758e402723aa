"""Serve a bailong model behind an OpenAI-compatible API (``/v1/chat/completions``) with its chat template.

    python -m bailong.serve outputs/sft/runs/<run>             # exported to <run>/export first, then served
    python -m bailong.serve exports/bailong-mini-instruct      # an export (or any Hugging Face model directory)
    python -m bailong.serve exports/bailong-mini/bailong-mini-f16.gguf   # llama.cpp, through llama-cpp-python

bailong writes no server of its own: a Hugging Face directory is served by ``transformers serve`` (the
``serve`` extra: ``pip install -e '.[serve]'``), a GGUF file by llama-cpp-python's server (the ``gguf`` extra),
both OpenAI-compatible and both rendering the chat template the export carries (``bailong.export``). A run
or adapter directory has to be merged first — neither server knows peft adapters on 4-bit weights — so it is
exported once to ``--export-dir`` (default ``<run>/export``) and that export is reused while its source
adapter is unchanged. On a GPU cluster, vLLM serves the same export: ``vllm serve <export dir>``.

Requests name the model as the server knows it, which the command prints: ``transformers serve`` answers to
the directory's path as given to it (it refuses any other name), llama-cpp-python's server to ``--model-name``
(default: the file's stem). The bench (``python -m bailong.eval bench --model-url http://HOST:PORT/v1
--model-name NAME``) and the judge call it by that name. The server binds ``127.0.0.1`` unless ``--host`` says
otherwise: it has no authentication.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from bailong.cache import fingerprint
from bailong.model.adapter import META_FILE, find_adapter
from bailong.model.loading import DEVICE_CHOICES, DEVICE_HELP, TRUST_REMOTE_CODE_HELP

SOURCE_FILE = "bailong_serve_source.json"  # which adapter state an export for serving was made from


def adapter_stamp(adapter_dir: Path) -> dict:
    """What identifies an adapter's contents: its path and its files' names, sizes and modification times (the
    cache's ``fingerprint``), as JSON reads it back."""
    return json.loads(json.dumps({"adapter": str(adapter_dir.resolve()), "files": fingerprint(str(adapter_dir))}))


def exported_for_serving(
    run: Path, export_dir: Path | None, *, device: str = "auto", trust_remote_code: bool = False
) -> Path:
    """The export of run ``run`` in ``export_dir`` (default ``<run>/export``): reused when it was made from the
    adapter as it is now, else (re)made."""
    from bailong.export import export

    adapter = find_adapter(run)
    out = export_dir or (run / "export")
    stamp_file, stamp = out / SOURCE_FILE, adapter_stamp(adapter)
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    if out.exists() and any(out.iterdir()):
        if not stamp_file.is_file():
            raise FileExistsError(f"{out}: exists, is not empty and is not an export made by bailong.serve")
        shutil.rmtree(out)  # an export of an older state of this adapter
    export(run, out, device=device, trust_remote_code=trust_remote_code)
    stamp_file.write_text(json.dumps(stamp))
    return out


def served_name(target: Path, model_name: str | None) -> str:
    """The model name requests must carry (see the module docstring)."""
    if target.suffix == ".gguf":
        return model_name or target.stem
    if model_name:
        raise ValueError(f"--model-name={model_name!r}: transformers serve answers to the directory's path only")
    return str(target)


def server_command(target: Path, host: str, port: int, model_name: str | None, device: str) -> list[str]:
    """The command that serves ``target``: llama-cpp-python's server for a ``.gguf`` file, else ``transformers
    serve`` for a Hugging Face model directory."""
    if target.suffix == ".gguf":
        # the chat template comes from the file's metadata (tokenizer.chat_template, written by the converter)
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(target), "--host", host]
        return command + ["--port", str(port), "--model_alias", served_name(target, model_name)]
    served_name(target, model_name)  # refuses a name transformers serve would not answer to
    return [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(target),
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        "cpu" if device == "cpu" else "auto",
    ]


def serve_target(path: Path, export_dir: Path | None, device: str, trust_remote_code: bool) -> Path:
    """What the server loads: a ``.gguf`` file or a model directory as given, a run's export otherwise."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a run, adapter, export or model directory, nor a .gguf file")
    if find_adapter(path) is not None:
        return exported_for_serving(path, export_dir, device=device, trust_remote_code=trust_remote_code)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json and no {META_FILE}: not a model, export or run directory")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bailong.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run, adapter or export directory, or a .gguf file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--model-name",
        help="name a GGUF model answers to (default: its stem; transformers serve: the path only)",
    )
    parser.add_argument("--export-dir", type=Path, help="where a run is exported for serving (default <run>/export)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print the server command instead of running it")
    args = parser.parse_args(argv)
    target = serve_target(Path(args.model), args.export_dir, args.device, args.trust_remote_code)
    command = server_command(target, args.host, args.port, args.model_name, args.device)
    if args.dry_run:
        print(" ".join(command))
        return 0
    name = served_name(target, args.model_name)
    print(f"serving {target} at http://{args.host}:{args.port}/v1 as model {name!r}", flush=True)
    # the server replaces this process (no child left behind): a stop signal reaches the server itself
    os.execve(command[0], command, {**os.environ, "HF_HUB_OFFLINE": "1"})


if __name__ == "__main__":
    sys.exit(main())
