"""The command line: every command documents itself, and bad input ends in a one-line error with status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from freevlm.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: freevlm {command}")
    assert "--" in out


def test_missing_checkpoint_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["evaluate", "--backbone", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: checkpoint folder not found: {tmp_path / 'nowhere'}"


def test_out_of_range_threshold_is_refused(tmp_path, capsys):
    from freevlm.generation.criteria import Confidence

    with pytest.raises(Exception, match=r"alpha must lie in \(0, 1\], got 1.5"):
        Confidence(1.5)


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "freevlm.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train-exits" in proc.stdout


def test_reproduce_refuses_an_unknown_method_before_any_work(tmp_path, capsys):
    code = main(["reproduce", "--quick", "--out", str(tmp_path / "r"), "--methods", "LeeBERT", "DeeBRT"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: unknown method 'DeeBRT' for --methods; choose from DeeBLIP, "
                                               "PABEE-BLIP, LeeBLIP, LeeBERT, MuE")
    assert not (tmp_path / "r").exists()


def test_reproduce_runs_the_methods_it_is_given(tmp_path, monkeypatch):
    import freevlm.reproduce as rep

    seen = []

    def stop(cfg, out, full, progress, tables=rep.TABLES):
        seen.append((cfg.methods, cfg.plan))
        assert tables == (rep.REAL_TABLES if cfg.real is not None else rep.TABLES)
        raise rep.FreeVLMError("stopped before training")

    monkeypatch.setattr(rep, "_run_seeds", stop)
    assert main(["reproduce", "--quick", "--out", str(tmp_path), "--methods", "LeeBERT", "FREE", "LeeBERT"]) == 2
    assert main(["reproduce", "--quick", "--out", str(tmp_path), "--no-plan"]) == 2
    assert seen == [(("FREE", "LeeBERT"), True), (("FREE", "DeeBLIP", "MuE"), False)]
    with pytest.raises(rep.FreeVLMError, match="stopped"):  # the real configuration runs the real tables
        rep.reproduce(tmp_path / "real", config=rep.real_config())
    assert seen[-1] == (("FREE", "DeeBLIP", "PABEE-BLIP", "LeeBLIP", "MuE"), False)
    with pytest.raises(rep.FreeVLMError, match="drop --quick"):
        rep.reproduce(tmp_path / "real", real=True, quick=True)
    assert rep.real_config().real is not None and rep.real_config().seeds == 1
    # the default run compares FREE with every baseline, the original LeeBERT included
    assert rep.ReproduceConfig().methods == ("FREE", "DeeBLIP", "PABEE-BLIP", "LeeBLIP", "LeeBERT", "MuE")
