"""What the command lines and the data workers import: `--help` is answered before torch loads, and a
DataLoader worker imports neither triton nor huggingface_hub (it needs neither)."""
import sys
import textwrap

from jobs import REPO, kill_leftovers, run  # noqa: F401 (kill_leftovers is a fixture)

HEAVY = ("torch", "triton", "huggingface_hub", "matplotlib")


def test_help_is_answered_before_torch_is_imported(tmp_path):
    """predict, evaluate, plot, `python train/main.py` and setr-train (train.launch:run, which names
    itself and shows the training flags): --help parsed and printed, and none of torch / triton /
    huggingface_hub / matplotlib imported."""
    code, stdout, stderr = run([sys.executable, "-c", textwrap.dedent(f"""
        import contextlib, io, runpy, sys
        from setr.evaluate import main as evaluate
        from setr.predict import main as predict
        from train.launch import run as setr_train
        from train.plot import main as plot

        def help_of(call):
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                try:
                    call()
                except SystemExit as e:
                    assert e.code == 0, e.code
            return text.getvalue()

        pages = [help_of(lambda: predict(["--help"])), help_of(lambda: evaluate(["--help"])),
                 help_of(lambda: plot(["--help"]))]
        sys.argv = ["setr-train", "--help"]
        pages.append(help_of(setr_train))
        sys.argv = ["train/main.py", "--help"]
        pages.append(help_of(lambda: runpy.run_path("{REPO}/train/main.py", run_name="__main__")))
        header, launcher = pages[3].split("\\n\\n", 1)
        assert header.startswith("setr-train [torchrun options") and launcher.startswith("usage: setr-train "), pages[3]
        assert all(page.startswith("usage: ") for page in pages[:3] + pages[4:]), pages
        assert "--checkpoint" in pages[0] and "--dataset" in pages[1] and "--preset" in pages[4]
        assert launcher.split() == pages[4].replace("train/main.py", "setr-train").split()  # (usage wrapped anew)
        print(sorted(m for m in {HEAVY} if m in sys.modules))
        """)], 120, cwd=tmp_path)
    assert code == 0, stderr
    assert stdout.strip() == "[]", stdout


WORKER_SCRIPT = """
import functools
import os
import sys


def check_imports(init, worker_id):
    init(worker_id)  # the training's worker_init_fn, unpickled in the worker as in training
    found = [m for m in ("triton", "huggingface_hub") if m in sys.modules]
    if found:
        raise RuntimeError(f"the data worker imported {found}")


if __name__ == "__main__":
    import torch

    from setr.data import TrainSamples, build_dataset
    from train.parallelize import data_worker_init

    dataset = build_dataset("synthetic", split="training", synthetic_size=(32, 48), synthetic_samples=4)
    samples = TrainSamples(dataset, 32, seed=0, scale=(96, 32))
    init = functools.partial(check_imports, functools.partial(data_worker_init, os.getpid()))
    loader = torch.utils.data.DataLoader(samples, batch_size=2, sampler=range(2), num_workers=1,
                                         collate_fn=samples.collate, worker_init_fn=init,
                                         multiprocessing_context="spawn")
    next(iter(loader))
    print("ok")
"""


def test_data_workers_import_neither_triton_nor_huggingface_hub(tmp_path):
    """A worker started on its own (spawn, as macOS and Python 3.14's default forkserver do) imports
    only what the samples and the worker_init_fn need."""
    script = tmp_path / "worker_imports.py"
    script.write_text(WORKER_SCRIPT)
    code, stdout, stderr = run([sys.executable, str(script)], 180, cwd=tmp_path)
    assert code == 0 and stdout.strip() == "ok", stderr[-3000:]
