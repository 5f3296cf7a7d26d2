"""The README's main job runs end to end and its round trips are exact on clean encodings."""
import re
import subprocess
import sys

from dense_diffusion import demo


def test_demo_run_writes_grid_and_exact_clean_round_trips(tmp_path, capsys):
  assert demo.show_encodings(workdir=str(tmp_path), resolution=48, num_scenes=1) == 0
  out = capsys.readouterr().out
  assert (tmp_path / "encodings.png").stat().st_size > 10_000
  rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(
      ("depth", "normals", "semantic", "instance", "panoptic", "shading", "denoise"))}
  assert "AbsRel 0.0000" in rows["depth"]
  assert "mean angle 0.00 deg" in rows["normals"]
  assert "mIoU 1.0000" in rows["semantic"]
  assert "PQ 1.0000" in rows["panoptic"]
  found, total = map(int, re.search(r"(\d+)/(\d+) instances found", rows["instance"]).groups())
  assert found == total > 0


def test_main_rejects_unknown_command():
  result = subprocess.run([sys.executable, "-m", "dense_diffusion.main", "trian"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "unknown command 'trian'" in result.stderr and "demo" in result.stderr
