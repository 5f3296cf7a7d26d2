"""The README's main job runs end to end and its round trips are exact on clean encodings."""
import sys

from dense_diffusion import demo
import subprocess_env


def test_demo_run_writes_grid_and_exact_clean_round_trips(tmp_path, capsys):
  assert demo.show_encodings(workdir=str(tmp_path), resolution=48, num_scenes=1) == 0
  out = capsys.readouterr().out
  assert (tmp_path / "encodings.png").stat().st_size > 10_000
  rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(
      ("depth", "normals", "semantic", "instance", "panoptic", "shading", "denoise"))}
  # The task's own headline metric of decode(encode(x)) against x, then with sampler-like noise.
  clean = {task: (words[-4], float(words[-3])) for task, words in rows.items()}
  assert clean["depth"][0] == "abs_rel" and clean["depth"][1] < 1e-4
  assert clean["normals"][0] == "mean" and clean["normals"][1] < 0.01  # degrees
  assert clean["semantic"] == ("miou", 1.0)
  assert clean["instance"] == ("pq", 1.0)
  assert clean["panoptic"] == ("pq", 1.0)
  assert clean["shading"][0] == "rmse" and clean["shading"][1] < 1e-3
  assert clean["denoise"][0] == "psnr" and clean["denoise"][1] > 100


def test_main_rejects_unknown_command():
  result = subprocess_env.run([sys.executable, "-m", "dense_diffusion.main", "trian"],
                              capture_output=True, timeout=120)
  assert result.returncode != 0
  assert "unknown command 'trian'" in result.stderr and "demo" in result.stderr
