"""CLI rough edges: a checkpoint-less --dummy-weights run (prompt and output as token ids; refused before
allocating when host RAM cannot hold it), --threads, --logit-bias, and a one-line error with exit 2 for
unwritable outputs, an existing file as make-tiny's directory, a trace without tokens, NaN weights and
a checkpoint without a tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hybrimoe.cli import main
from hybrimoe.trace.format import RoutingTrace
from hybrimoe.trace.importers import load_any_trace

TRACE = Path(__file__).resolve().parents[1] / "hybrimoe/data/traces/mixtral-8x7b/humaneval.jsonl.gz"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str, *words: str) -> str:
    """The error message, checked to be one line without a traceback, naming `words`."""
    assert "Traceback" not in err, err
    prefix = f"hybrimoe {command}: error: "
    assert prefix in err, err
    message = err[err.index(prefix) + len(prefix):]
    assert message.count("\n") == 1 and message.endswith("\n"), message
    for word in words:
        assert word in message, (word, message)
    return message


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3-moe")


@pytest.fixture(scope="module")
def config_only(model_dir: Path, tmp_path_factory) -> Path:
    """A directory holding only the checkpoint's config.json (no weights, no tokenizer)."""
    out = tmp_path_factory.mktemp("config-only")
    shutil.copy(model_dir / "config.json", out / "config.json")
    return out / "config.json"


def test_dummy_weights_run_without_a_checkpoint_on_token_ids(capsys, config_only: Path) -> None:
    common = ("generate", "--dummy-weights", str(config_only), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
              "--dtype", "fp32", "--cost-profile", "paper-a6000", "--threads", "1")
    code, out, err = run_cli(capsys, *common, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["text"] == "" and row["prompt_tokens"] == 3 and row["completion_tokens"] == 5
    assert len(row["token_ids"]) == 5 and row["model"] == "dummy-" + config_only.parent.name
    assert row["threads"] == 1
    code, streamed, err = run_cli(capsys, *common)
    assert code == 0 and streamed.split() == [str(t) for t in row["token_ids"]]  # same seed, same ids
    code, _, err = run_cli(capsys, "generate", "--dummy-weights", str(config_only), "--prompt", "hi")
    assert code == 2
    one_line_error(err, "generate", "--prompt-ids")
    code, _, err = run_cli(capsys, "generate", "--prompt-ids", "1")
    assert code == 2
    one_line_error(err, "generate", "--model", "--dummy-weights")


def test_a_dummy_model_that_host_ram_cannot_hold_is_refused_before_allocating(capsys, monkeypatch) -> None:
    import hybrimoe.moe.store as store

    monkeypatch.setattr(store, "host_available_bytes", lambda: 2 * 10**9)  # a 2 GB machine
    allocated: list[int] = []  # element counts of large torch.empty requests
    real_empty = store.torch.empty

    def watched_empty(*size, **kw):
        dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        numel = 1
        for d in dims:
            numel *= int(d)
        tensor = real_empty(*size, **kw)
        if numel > 10**8 and tensor.device.type != "meta":  # the budget check sizes a meta-device model
            allocated.append(numel)
        return tensor

    monkeypatch.setattr(store.torch, "empty", watched_empty)
    code, _, err = run_cli(capsys, "generate", "--dummy-weights", "deepseek-v2-lite", "--prompt-ids", "1,2",
                           "--replay-trace", str(TRACE))
    assert code == 2
    one_line_error(err, "generate", "host memory", "2.00 GB")
    assert not allocated, "the expert store was allocated before the check"


def test_threads_and_logit_bias_flags(capsys, model_dir: Path) -> None:
    code, out, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", "hello", "--dtype", "fp32",
                             "--json", "--max-new-tokens", "4", "--threads", "1", "--logit-bias", "17=100")
    assert code == 0, err
    row = json.loads(out)
    assert row["threads"] == 1 and row["token_ids"] == [17] * 4
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", "x", "--logit-bias", "17")
    assert code == 2
    one_line_error(err, "generate", "--logit-bias")
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", "x", "--frequency-penalty", "3")
    assert code == 2
    one_line_error(err, "generate", "frequency_penalty")


def test_unwritable_outputs_are_one_line_errors(capsys, model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    inside = str(blocker / "out")  # a path whose "directory" is a regular file
    cases = [
        (("generate", "--model", str(model_dir), "--prompt", "x", "--record-trace", inside + ".jsonl"),
         "--record-trace"),
        (("simulate", "--trace", str(TRACE), "--policy", "hybrimoe", "--max-decode", "1", "--plot", inside + ".png"),
         "--plot"),
        (("import-trace", str(TRACE), "--out", inside + ".jsonl.gz"), "--out"),
        (("bench", "--quick", "--out", inside), "--out"),
        (("bench", "--quick", "--out", str(blocker)), "--out"),
        (("make-tiny", "--family", "qwen3-moe", "--out", str(blocker)), "--out"),
    ]
    for argv, flag in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        one_line_error(err, argv[0], flag)
        assert out == "", argv  # nothing printed as if it had worked
    assert blocker.read_text() == "x"


def test_a_trace_without_tokens_is_refused(capsys, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    RoutingTrace(load_any_trace(str(TRACE)).header).save(empty)
    code, out, err = run_cli(capsys, "simulate", "--trace", str(empty))
    assert code == 2 and out == ""
    one_line_error(err, "simulate", "no routed tokens")


def _copy_checkpoint(src: Path, dst: Path, tokenizer: bool) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if tokenizer or not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


def test_nan_weights_are_a_one_line_error(capsys, model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = _copy_checkpoint(model_dir, tmp_path / "nan", tokenizer=True)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if "norm" in n and n.startswith("model.norm"))
    tensors[name][0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    for temperature in ("0", "1"):
        code, _, err = run_cli(capsys, "generate", "--model", str(broken), "--prompt", "hi", "--dtype", "fp32",
                               "--temperature", temperature)
        assert code == 2
        one_line_error(err, "generate", "non-finite logits")


def test_a_checkpoint_without_a_tokenizer_is_a_one_line_error(capsys, model_dir: Path, tmp_path: Path) -> None:
    bare = _copy_checkpoint(model_dir, tmp_path / "bare", tokenizer=False)
    code, _, err = run_cli(capsys, "generate", "--model", str(bare), "--prompt", "hi", "--dtype", "fp32")
    assert code == 2
    one_line_error(err, "generate", "tokenizer", str(bare))


def test_an_os_error_at_write_time_is_one_line(capsys, monkeypatch) -> None:
    def disk_full(args) -> int:
        raise OSError(28, "No space left on device", "/data/out.png")

    monkeypatch.setattr("hybrimoe.cli.make_tiny.run", disk_full)  # read when main() builds the parser
    code, _, err = run_cli(capsys, "make-tiny", "--family", "mixtral", "--out", "unused")
    assert code == 2
    one_line_error(err, "make-tiny", "No space left on device", "/data/out.png")
