"""What a user sees when an option is wrong: one line, exit status 2, before any model or data is built.

``integrations/run_clm.py`` answers a bad option the way a command-line tool does (argparse's
``prog: error: message`` and exit status 2), without a traceback, and before it builds the corpus
or the model (the cache directory stays empty). So does any script that parses
``SasshaTrainingArguments`` with ``HfArgumentParser``. A stock ``Trainer`` given
``optim="sassha"`` is refused at construction, naming ``SasshaTrainer``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, Trainer

from sassha_dist.integrations.embedded import BlockDataset, tiny_gpt2
from sassha_dist.integrations.transformers import SasshaTrainer, SasshaTrainingArguments
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SASSHA_DIST_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.fixture(scope="module")
def run_clm():
    spec = importlib.util.spec_from_file_location("run_clm_under_test", ROOT / "integrations/run_clm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--optim_args", "rho=abc"], "Invalid optim_args value rho='abc' for sassha: expected a float."),
        (["--optim_args", "no_such_key=1"], "Unknown optim_args key 'no_such_key' for sassha."),
        (["--optim_args", "rho=-1"], "Invalid rho=-1.0."),
        (["--optim_args", "betas=0.9:1.5"], "Invalid betas[1]=1.5."),
        (["--optim_args", "lazy_hessian=0"], "Invalid lazy_hessian=0."),
        (["--learning_rate", "-1"], "Invalid lr=-1.0."),
        (["--optim", "no_such_optimizer"], "no_such_optimizer is not a valid OptimizerNames"),
        (["--from_scratch", "--model_name_or_path", "gpt2"], "--from_scratch trains the embedded"),
        (["--validation_file", "v.txt"], "--validation_file needs --train_file."),
        (["--train_file", "no/such/file.txt"], "--train_file no/such/file.txt: no such file."),
    ],
)
def test_run_clm_refuses_a_bad_option_in_one_line(run_clm, tmp_path, monkeypatch, capsys, options, message):
    monkeypatch.setenv("SASSHA_DIST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        run_clm.main(["--output_dir", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    (line,) = _error_lines(stderr)
    assert ": error: " in line and message in line, stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_run_clm_bad_option_as_a_process(tmp_path):
    """The real command: status 2, one line on stderr, no traceback, nothing built (~8 s of imports)."""
    result = subprocess.run(
        [sys.executable, "integrations/run_clm.py", "--optim_args", "rho=abc"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert _error_lines(result.stderr) == [
        "run_clm.py: error: Invalid optim_args value rho='abc' for sassha: expected a float."
    ]
    assert result.stdout == "" and not (tmp_path / "cache").exists()


def test_run_clm_bad_option_under_accelerate_launch_quiet(tmp_path):
    """Under ``accelerate launch -q`` (two processes, DDP) the line is printed once and no traceback
    follows; accelerate exits 1 (it does not pass the script's status 2 on). Without ``-q``
    accelerate adds its own CalledProcessError / ChildFailedError traceback after the line."""
    result = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "-q",
            "--config_file", "launch/accelerate/cpu_ddp.yaml", "--main_process_port", str(free_port()),
            "integrations/run_clm.py", "--optim_args", "no_such_key=1",
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("run_clm.py: error: Unknown optim_args key 'no_such_key' for sassha.")
    assert not (tmp_path / "cache").exists()


def test_hf_argument_parser_refuses_bad_optim_args_like_argparse(tmp_path, capsys):
    """A user's own script: ``HfArgumentParser(SasshaTrainingArguments)`` exits 2 with one line, as
    argparse does for an invalid choice; built in code, the arguments raise ``ValueError``."""
    parser = HfArgumentParser(SasshaTrainingArguments)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "sassha", "--optim_args", "rho=-0.5"]
        )
    assert exit_info.value.code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.endswith("error: Invalid rho=-0.5. Must be >= 0 and finite, or a callable of the step.")
    with pytest.raises(ValueError, match=r"Invalid rho=-0\.5"):
        SasshaTrainingArguments(output_dir=str(tmp_path), optim="sassha", optim_args="rho=-0.5")


def test_stock_trainer_with_optim_sassha_fails_at_construction_naming_sasshatrainer(tmp_path):
    """Without the check, the stock Trainer fails only inside train(), after the data is processed:
    "Trainer cannot instantiate unsupported optimizer: sassha"."""
    args = SasshaTrainingArguments(
        output_dir=str(tmp_path), optim="sassha", report_to="none", use_cpu=True, max_steps=1
    )
    dataset = BlockDataset(torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="optim='sassha' needs SasshaTrainer, not Trainer") as error:
        Trainer(model=tiny_gpt2(n_positions=8), args=args, train_dataset=dataset)
    assert "from sassha_dist.integrations.transformers import SasshaTrainer" in str(error.value)

    class MyTrainer(Trainer):  # a subclass of the stock Trainer is refused too
        pass

    with pytest.raises(TypeError, match="not MyTrainer"):
        MyTrainer(model=tiny_gpt2(n_positions=8), args=args, train_dataset=dataset)
    # SasshaTrainer, and the arguments' own get_process_log_level called from anywhere else, are fine.
    SasshaTrainer(model=tiny_gpt2(n_positions=8), args=args, train_dataset=dataset)
    assert isinstance(args.get_process_log_level(), int)


def test_bench_help_shows_defaults():
    from sassha_dist.bench.__main__ import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    step_time = subcommands.choices["step-time"].format_help()
    for shown in ("default: cpu", "(default: 1 10)", "default: 7", "(default: eager)"):
        assert shown in " ".join(step_time.split()), step_time
    for name, sub in subcommands.choices.items():
        for action in sub._actions:
            default = action.default
            if action.option_strings and default not in (None, False, "==SUPPRESS==") and action.help:
                assert "default" in action.help, (name, action.option_strings)
