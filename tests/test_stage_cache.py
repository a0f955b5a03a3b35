"""recipes/stage_cache.py through chain.run_stage: a stage another workdir ran with the same config, inputs,
code and numerics is copied, not trained (its files byte for byte, its paths rewritten to the new workdir);
anything that changes the outcome is a miss."""
import json
import os

import ml_collections as mlc
import pytest

from rlhf_jax.recipes import chain, stage_cache

# A stand-in stage: counts its trainings, writes random bytes (a copy is the only way to get them
# again) and a stage.json naming the stage it read, as the real stages do.
STAGE = '''
import json, os
def get_config():
  raise NotImplementedError("configs come from the test")
def train(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.environ["TOY_STAGE_COUNTER"], "a") as f:   # not in the config: it changes
    f.write(os.path.basename(workdir) + "\\n")
  if config.init_from:
    assert os.path.exists(os.path.join(config.init_from, "blob")), config.init_from
  blob = os.urandom(32)
  open(os.path.join(workdir, "blob"), "wb").write(blob)
  json.dump({"stage": "toy", "init_from": config.init_from}, open(os.path.join(workdir, "stage.json"), "w"))
  return {"blob": blob.hex(), "from": config.init_from, "lr": config.lr}
'''


@pytest.fixture
def env(tmp_path, monkeypatch):
  exp = tmp_path / "toy_exp.py"
  exp.write_text(STAGE)
  monkeypatch.setenv("RLHF_JAX_STAGE_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("TOY_STAGE_COUNTER", str(tmp_path / "trained.txt"))
  data = tmp_path / "data.txt"
  data.write_text("corpus")
  return {"exp": exp, "counter": tmp_path / "trained.txt", "data": data, "root": tmp_path}


def _run(env, workdir, lr=0.1, data=None):
  """Two stages: `up` (reads a data file) and `down` (init_from <workdir>/up)."""
  workdir = str(workdir)
  up = mlc.ConfigDict(dict(init_from="", lr=0.5, data=str(data or env["data"])))
  down = mlc.ConfigDict(dict(init_from=os.path.join(workdir, "up"), lr=lr, data=""))
  results = {}
  for name, cfg in (("up", up), ("down", down)):
    chain.run_stage(name, str(env["exp"]), cfg, workdir, results)
  return results


def _trained(env):
  return env["counter"].read_text().split() if env["counter"].exists() else []


def test_a_second_workdir_copies_both_stages_and_rewrites_their_paths(env, capsys):
  a, b = env["root"] / "runs" / "a", env["root"] / "runs" / "b"
  first = _run(env, a)
  assert _trained(env) == ["up", "down"] and all(r["cache_key"] for r in first.values())
  second = _run(env, b)
  assert _trained(env) == ["up", "down"]                                  # nothing trained again
  out = capsys.readouterr().out
  assert out.count("reused from the stage cache") == 2
  for name in ("up", "down"):
    assert (b / name / "blob").read_bytes() == (a / name / "blob").read_bytes()
    assert second[name]["cache_key"] == first[name]["cache_key"]
    assert second[name]["result"]["blob"] == first[name]["result"]["blob"]
    assert second[name]["reused"]["trained_seconds"] == pytest.approx(first[name]["seconds"])
  # The copy names the new workdir's stages, in stage.json and in its result.
  assert json.load(open(b / "down" / "stage.json"))["init_from"] == os.path.join(str(b), "up")
  assert second["down"]["result"]["from"] == os.path.join(str(b), "up")
  assert json.load(open(a / "down" / "stage.json"))["init_from"] == os.path.join(str(a), "up")
  # results/<name>.json is written as for a trained stage: a re-run of b reads it and copies nothing.
  assert _run(env, b) == second and "reused" not in capsys.readouterr().out


def test_what_changes_the_outcome_is_a_miss(env, monkeypatch):
  _run(env, env["root"] / "a")
  _run(env, env["root"] / "b", lr=0.2)                                      # down's config changed
  assert _trained(env) == ["up", "down", "down"]
  env["data"].write_text("another corpus")                                # a file the config names
  _run(env, env["root"] / "c")
  assert _trained(env)[3:] == ["up", "down"]                              # up missed, so down did too
  monkeypatch.setitem(stage_cache._CODE, "sha", "edited source")         # any code change
  _run(env, env["root"] / "d")
  assert _trained(env)[5:] == ["up", "down"]


def test_off_or_reading_an_unkeyed_stage_trains(env, monkeypatch):
  monkeypatch.setenv("RLHF_JAX_STAGE_CACHE", "none")
  off = _run(env, env["root"] / "a")
  assert off["up"]["cache_key"] is None and not (env["root"] / "cache").exists()
  monkeypatch.setenv("RLHF_JAX_STAGE_CACHE", str(env["root"] / "cache"))
  again = _run(env, env["root"] / "a")      # both finished in a: read back, never keyed
  assert again == off
  # In a fresh workdir `up` is keyed; a `down` whose `up` has no key is trained and not stored.
  work = env["root"] / "b"
  (work / "results").mkdir(parents=True)
  (work / "up").mkdir()
  (work / "up" / "blob").write_bytes(b"x")
  json.dump({"result": {}, "seconds": 0.0}, open(work / "results" / "up.json", "w"))
  cfg = mlc.ConfigDict(dict(init_from=str(work / "up"), lr=0.1, data=""))
  assert stage_cache.stage_key("down", str(env["exp"]), cfg, str(work)) is None
  assert chain.run_stage("down", str(env["exp"]), cfg, str(work), {})["cache_key"] is None
  assert _trained(env) == ["up", "down", "down"]
