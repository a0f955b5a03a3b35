"""Test setup, all of it for speed on a 2-core CPU, where XLA compilation of tiny programs is most of the time:

- Simulated CPU devices only where a test needs a mesh (set before jax initialises its backend), and
  FAST_COMPILE below in XLA_FLAGS. A jitted program on an 8-device mesh costs ~1.5-2x its 1-device version here
  (8 partitions to compile and run on 2 cores), so under xdist one worker (MESH_WORKER) has 8 devices and runs
  the modules that build meshes (MESH_MODULES) besides its share of the rest; the other workers have 1 device
  and never get those modules (the scheduler below). Without xdist, or under another --dist mode, every
  process has 8 devices.
- One XLA compilation cache for the session. Many programs are compiled again and again (every stage
  run, resume test and smoke subprocess builds fresh jitted functions of the same HLO); JAX's persistent
  compilation cache keys on the program itself, so a session-wide cache directory turns those recompiles
  into file reads. The pytest process creates it (a fresh temporary directory, removed at exit) and
  exports it through JAX_COMPILATION_CACHE_DIR to everything it starts: the xdist workers and the
  subprocesses of the CLI / smoke / multi-process tests. Nothing persists between sessions; set
  JAX_COMPILATION_CACHE_DIR yourself to keep a cache across runs.
- glibc malloc set to reuse XLA:CPU's per-execution buffers (`rlhf_jax.host_malloc`, as the CLI does),
  before JAX starts; the CLI subprocesses set it themselves.
- Bytecode written under a session-temporary prefix where PYTHONDONTWRITEBYTECODE would make every process
  recompile every imported source (below).
- The longest modules first (LONGEST_FIRST), so that the xdist workers finish together.
"""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# XLA:CPU compiles these tiny programs 2-3x faster at LLVM optimisation level 0 and with the classic
# fusion code generator instead of the MLIR fusion emitters; here compilation, not execution, is the
# time (the arithmetic, IEEE float32, is the same either way).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# The modules whose tests build multi-device meshes (up to 2 x 2 x 2), and the xdist worker that runs them.
MESH_MODULES = ("test_parallel.py", "test_loop.py", "test_ppo_train.py", "test_vision.py")
MESH_WORKER, MESH_DEVICES = "gw0", 8
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")   # set by xdist before it loads this file; None without xdist
_MESH_SCHEDULER = "RLHF_JAX_TESTS_MESH_SCHEDULER"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _CACHE = tempfile.mkdtemp(prefix="rlhf_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # tiny programs are the point
# Bytecode. Where PYTHONDONTWRITEBYTECODE is set over a venv installed with `pip install --no-compile` (the README's
# install), no .pyc exists and none is written, so each of the session's Python processes (the xdist workers and
# every CLI / smoke / multi-process subprocess) compiles the sources of jax, flax, transformers and the rest again:
# ~2 s of CPU each. The session instead writes bytecode under its own temporary prefix (removed at exit; nothing is
# written beside any source), so only the first process that imports a module compiles it.
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
  _PYCACHE = tempfile.mkdtemp(prefix="rlhf_jax_tests_pycache_")
  os.environ["PYTHONPYCACHEPREFIX"] = _PYCACHE
  del os.environ["PYTHONDONTWRITEBYTECODE"]
  sys.pycache_prefix, sys.dont_write_bytecode = _PYCACHE, False
  atexit.register(shutil.rmtree, _PYCACHE, ignore_errors=True)

from rlhf_jax import host_malloc  # noqa: E402

host_malloc.configure()

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data beside the repo; skips when absent (a user's fresh clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the repo in CI)")
  return SHARED_DATA

# The longest modules first (roughly by their time on 2 CPU cores; the rest keep pytest's order). Under
# `--dist loadfile` the workers take modules in collection order (pytest_configure below turns off
# xdist's default order, by number of tests, which would start these few-test, long modules last and
# leave one worker idle at the end).
LONGEST_FIRST = ("test_instructgpt_smoke.py", "test_multiprocess.py", "test_vision_train.py", "test_instructgpt_hh.py",
                 "test_lora.py",
                 "test_real_rm.py", "test_ppo_train.py", "test_parallel.py", "test_generic_stages.py",
                 "test_model.py", "test_policy_gradient.py", "test_dpo.py", "test_fast_paths.py", "test_main.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  # This process's device count, before any test module is imported (and so before JAX starts its backend): 1 for
  # the workers that the scheduler below keeps away from MESH_MODULES (`--dist loadfile`), else MESH_DEVICES. The
  # xdist controller runs no test: it leaves XLA_FLAGS as the user set it and tells its workers (which inherit its
  # environment; their own config says dist "no") whether its scheduler is the one below.
  if _WORKER is None and getattr(config.option, "numprocesses", None):
    os.environ[_MESH_SCHEDULER] = str(int(config.getvalue("dist") == "loadfile"))
    return
  one_device = _WORKER not in (None, MESH_WORKER) and os.environ.get(_MESH_SCHEDULER) == "1"
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={1 if one_device else MESH_DEVICES} "
                                     f"{FAST_COMPILE}")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: a module's tests stay in order


def pytest_xdist_make_scheduler(config, log):
  """`--dist loadfile`, except that MESH_MODULES go only to MESH_WORKER (the one worker with 8 devices), which
  takes them before anything else; the 1-device workers stop once only those are left."""
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  def needs_mesh(scope: str) -> bool:
    return Path(scope.split("::")[0]).name in MESH_MODULES

  class MeshWorkerScheduling(LoadFileScheduling):
    def schedule(self):
      # With fewer modules than workers xdist stops the last-added workers: keep the mesh worker first, so never it.
      if self.collection is None:
        self.assigned_work = dict(sorted(self.assigned_work.items(), key=lambda kv: kv[0].gateway.id != MESH_WORKER))
      super().schedule()

    def _assign_work_unit(self, node):
      if node.gateway.id == MESH_WORKER:   # mesh modules first, then anything
        fits = [s for s in self.workqueue if needs_mesh(s)] or list(self.workqueue)
      else:
        fits = [s for s in self.workqueue if not needs_mesh(s)]
        if not fits:
          if any(n.gateway.id == MESH_WORKER and not n.shutting_down for n in self.nodes):
            node.shutdown()        # what is left needs the mesh worker's devices
            return
          fits = list(self.workqueue)   # no mesh worker (it died): a mesh test fails naming the devices it needs
      self.workqueue.move_to_end(fits[0], last=False)
      super()._assign_work_unit(node)

  return MeshWorkerScheduling(config, log)
