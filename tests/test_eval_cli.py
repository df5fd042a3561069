"""`python -m eval`: lm-eval's own command line with the Ling models registered and eval/tasks/ on the include
path, run offline on a tiny checkpoint, and its one-sentence errors before any model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # eval/ is used from the checkout, like callbacks/
    sys.path.insert(0, str(ROOT))

from lm_eval._cli import HarnessCLI  # noqa: E402

import eval.lm  # noqa: E402
from eval.__main__ import PRETRAINED_HINT, TASKS_DIR, include_paths, main, prepare  # noqa: E402
from ling import preset  # noqa: E402
from ling.checkpoint import save_pretrained  # noqa: E402
from ling.data.tokenizer import ByteTokenizer  # noqa: E402
from ling.model import build_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*rope_scaling. is deprecated.*:FutureWarning")
HEADER = ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(0)
    save_pretrained(build_model(preset("tiny")), folder, tokenizer=ByteTokenizer())
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if lm-eval gets as far as building a Ling model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(eval.lm.LingLM, "__init__", refuse)


def table(stdout: str) -> list[list[str]]:
    """The rows of lm-eval's markdown results table, cells stripped (the separator row left out)."""
    rows = [line.strip().strip("|").split("|") for line in stdout.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if not set("".join(row)) <= set("-:")]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cwd / "datasets-cache"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "eval", *args]
    return subprocess.run(
        command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )


def test_run_prints_lm_eval_results_table_offline_from_another_directory(tiny_folder, tmp_path):
    """No --include_path and no --device: the task is found in eval/tasks/, and the model runs on the CPU
    here (lm-eval's default device is cuda:0). The printed accuracy is the one the logged samples give."""
    out = tmp_path / "results"
    result = run_cli(
        ["--model", "ling", "--model_args", f"pretrained={tiny_folder}", "--tasks", "ling_arithmetic_mc",
         "--limit", "16", "--output_path", str(out), "--log_samples"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert rows[0] == HEADER
    acc, acc_norm = rows[1:]
    assert acc[:5] == ["ling_arithmetic_mc", "1", "none", "0", "acc"] and acc_norm[4] == "acc_norm"
    (samples,) = out.rglob("samples_ling_arithmetic_mc_*.jsonl")
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 16
    # The oracle: the choice with the highest log-likelihood (per character for acc_norm) against the label.
    right, right_norm = [], []
    for sample in lines:
        lls = [float(ll) for ll, _ in sample["filtered_resps"]]
        lengths = [len(choice) for choice in sample["doc"]["choices"]]
        right.append(max(range(4), key=lambda i: lls[i]) == sample["doc"]["label"])
        right_norm.append(max(range(4), key=lambda i: lls[i] / lengths[i]) == sample["doc"]["label"])
    assert float(acc[6]) == pytest.approx(sum(right) / 16, abs=1e-4)
    assert float(acc_norm[6]) == pytest.approx(sum(right_norm) / 16, abs=1e-4)
    (results,) = out.rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]["ling_arithmetic_mc"]
    assert scores["acc,none"] == pytest.approx(sum(right) / 16)


def test_a_missing_checkpoint_is_one_sentence_on_stderr(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli(
        ["--model", "ling", "--model_args", f"pretrained={missing}", "--tasks", "ling_arithmetic_mc"], tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: pretrained={str(missing)!r} does not exist; pass {PRETRAINED_HINT}."
    assert result.stdout == ""


def test_an_unknown_task_is_one_sentence_before_any_model_loads(tiny_folder, capsys, no_model):
    code = main(["--model", "ling", "--model_args", f"pretrained={tiny_folder}", "--tasks", "ling_arithmetc_mc"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: unknown task 'ling_arithmetc_mc' (did you mean ") and "\n" not in err
    assert "ling_arithmetic_mc" in err.split("(did you mean ", 1)[1].split(")")[0]
    assert err.endswith("`python -m eval ls tasks` lists the tasks, groups and tags.")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "ling", "--tasks", "ling_arithmetic_mc"],
         "error: --model ling needs --model_args pretrained=PATH"),
        (["--model", "lingg", "--tasks", "x"],
         "error: --model 'lingg' is not a registered lm-eval model (did you mean ling"),
        (["--model", "dummy", "--tasks", "ling_arithmetic_mc", "--include_path", "/no/such/tasks"],
         "error: --include_path '/no/such/tasks' does not exist; pass a folder of task YAML files."),
        (["--model", "dummy", "--tasks", "/no/such/task.yaml"], "error: task file '/no/such/task.yaml' does not exist"),
        (["--config", "/no/such/run.yaml", "--tasks", "x"], "error: --config '/no/such/run.yaml' does not exist"),
    ],
)  # fmt: skip
def test_other_bad_input_is_one_sentence(args, message, capsys, no_model):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def _user_tasks(folder: Path) -> Path:
    """A folder with one task of the user's own: a JSON-lines multiple-choice set at an absolute path."""
    folder.mkdir()
    data = folder / "items.jsonl"
    items = [{"question": f"{i} plus one is", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(3)]
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "user_task.yaml").write_text(
        "task: user_task\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    return folder


def test_the_users_include_paths_are_kept(tmp_path, monkeypatch):
    user = _user_tasks(tmp_path / "mine")
    assert include_paths(None) == [str(TASKS_DIR)]
    assert include_paths(str(TASKS_DIR)) == [str(TASKS_DIR)]  # not indexed twice
    assert include_paths([str(user), str(user)]) == [str(TASKS_DIR), str(user)]
    monkeypatch.setattr(sys, "argv", ["eval", "--model", "dummy", "--tasks", "ling_arithmetic_mc,user_task",
                                      "--include_path", str(user)])  # fmt: skip
    args = HarnessCLI().parse_args()
    prepare(args)  # both names are found in the two folders
    assert args.include_path == [str(TASKS_DIR), str(user)]


def test_a_config_files_include_path_is_kept_and_both_tasks_run(tmp_path, capsys, monkeypatch):
    """--config settings count as given (lm-eval's precedence: flags over the YAML over defaults)."""
    user = _user_tasks(tmp_path / "mine")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: dummy\ntasks: [ling_arithmetic_mc, user_task]\ninclude_path: {user}\n")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert main(["--config", str(config), "--limit", "2"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows[0] == HEADER
    assert {row[0] for row in rows[1:] if row[0]} == {"ling_arithmetic_mc", "user_task"}


def test_other_subcommands_see_the_offline_tasks(capsys):
    assert main(["validate", "--tasks", "ling_arithmetic_mc,ling_arithmetic_gen,ling_shakespeare_ppl"]) == 0
    assert "All tasks found and valid" in capsys.readouterr().out
