"""The vendor-neutral exp, log, sqrt, cos and sin: correctly rounded, torch's gradients, torch's special values, and no
function of MKL's vector-math library (whose bits depend on the CPU's vendor) left in training or sampling."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.configuration.settings import Sft
from kalmanrl.data.prompts import get_template
from kalmanrl.jobs.sft import run_sft
from kalmanrl.jobs.trainer import train
from kalmanrl.policy.model import load_policy
from kalmanrl.runtime import vendor_neutral

# The aten functions torch's CPU build computes with MKL's VML for float32/float64 (ATen/cpu/vml.h, torch 2.13),
# out-of-place, in place and as _foreach_ lists.
VML_FUNCTIONS = {"acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
                 "tan", "tanh"}


class VMLCalls(TorchDispatchMode):
    """Counts the calls of VML-backed aten functions on CPU float tensors (by function name)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.removeprefix("_foreach_").rstrip("_")
        if name in VML_FUNCTIONS and any(
                isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
                for t in torch.utils._pytree.tree_leaves((args, kwargs))):
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def rounded(values: np.ndarray, function) -> np.ndarray:
    """`function` (math's, in float64) of each value, rounded to float32."""
    return np.array([function(float(v)) for v in values], dtype=np.float64).astype(np.float32)


RNG = np.random.default_rng(0)
POSITIVE = np.concatenate([RNG.uniform(0, 2, 4000), np.exp(RNG.uniform(-80, 80, 4000)), [1e-45, 1.0, 3e38]])
ANY = np.concatenate([RNG.uniform(-3, 3, 4000), RNG.uniform(-87, 88, 4000)])
ANGLES = np.concatenate([RNG.uniform(-4, 4, 4000), RNG.uniform(-5000, 5000, 4000)])


@pytest.mark.parametrize(("function", "reference", "values"), [
    (vendor_neutral.exp, math.exp, ANY), (vendor_neutral.log, math.log, POSITIVE),
    (vendor_neutral.sqrt, math.sqrt, POSITIVE),
    (lambda x: vendor_neutral.cos_sin(x)[0], math.cos, ANGLES),
    (lambda x: vendor_neutral.cos_sin(x)[1], math.sin, ANGLES),
], ids=["exp", "log", "sqrt", "cos", "sin"])
def test_each_function_is_correctly_rounded_on_the_cpu(function, reference, values):
    x = values.astype(np.float32)
    got = function(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got, rounded(x, reference))


def test_special_values_are_torchs():
    x = torch.tensor([0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 1e-45, 1.0, 100.0, -100.0])
    for ours, theirs in ((vendor_neutral.exp, torch.exp), (vendor_neutral.log, torch.log),
                         (vendor_neutral.sqrt, torch.sqrt)):
        assert torch.allclose(ours(x), theirs(x), rtol=1e-6, atol=0, equal_nan=True), ours


def test_gradients_are_torchs_and_other_dtypes_keep_theirs():
    x = torch.tensor([0.25, 1.0, 3.5], dtype=torch.float64)
    for ours, theirs in ((vendor_neutral.exp, torch.exp), (vendor_neutral.log, torch.log),
                         (vendor_neutral.sqrt, torch.sqrt)):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours(a).sum().backward()
        theirs(b).sum().backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-15), ours
        assert ours(x.bfloat16()).dtype == torch.bfloat16


def test_the_rotary_embedding_keeps_transformers_values_to_the_last_bit(tiny_model_dir):
    policy, _ = load_policy(tiny_model_dir)
    rotary = policy.model.rotary_emb
    x, positions = torch.zeros(1, 500, 8), torch.arange(500)[None]
    with VMLCalls() as vml:
        cos, sin = rotary(x, positions)
    assert not vml.calls
    theirs = type(rotary).forward(rotary, x, positions)
    ulp = torch.finfo(torch.float32).eps
    assert torch.allclose(cos, theirs[0], rtol=0, atol=ulp) and torch.allclose(sin, theirs[1], rtol=0, atol=ulp)


# The paper algorithms (the config's defaults), and one of each other loss part that computes an exp, log or sqrt.
OTHERS = {
    "gspo": {"advantage": "grpo", "ratio": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
    "gmpo": {"advantage": "grpo", "ratio": "token", "surrogate": "geometric_mean", "eps_low": 0.4, "eps_high": 0.4},
    "tis": {"advantage": "grpo", "ratio": "token", "rollout_correction": {"name": "token_tis"}},
    "seq_tis": {"advantage": "grpo", "ratio": "token", "rollout_correction": {"name": "sequence_tis"}},
}


# One RL step of a tiny run, and a two-step warm start: what the probes below watch.
ONE_STEP = {"train": {"steps": 1, "prompts_per_step": 2, "group_size": 4, "mini_batches": 2, "max_tokens": 8},
            "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "krpo_arithmetic"}},
            "tasks": ["arith"], "benchmarks": ["arith"]}
WARM_START = Sft(steps=2, batch_size=4, lr=1e-3, weight_decay=0.1, warmup_steps=0, schedule="constant", max_length=64,
                 max_grad_norm=1.0, log_every=1, precision="float32")


def train_settings(algorithm: str) -> dict:
    """The training job's settings for `algorithm` (the config's defaults or one of OTHERS) under ONE_STEP."""
    config = validate_config({**ONE_STEP, "algorithms": {**validate_config(ONE_STEP)["algorithms"], **OTHERS}})
    return stage_settings(config, "train", model="tiny", task="arith", algorithm=algorithm, seed="0")


@pytest.mark.parametrize("algorithm", ["grpo", "krpo", "kpo", *OTHERS])
def test_no_vml_function_runs_in_sampling_scoring_or_an_update(tmp_path, tiny_model_dir, arithmetic_parquet,
                                                               algorithm):
    with VMLCalls() as vml:
        train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=train_settings(algorithm))
    assert not vml.calls, dict(vml.calls)


def test_no_vml_function_runs_in_a_warm_start_step(tmp_path, tiny_model_dir, arithmetic_parquet):
    with VMLCalls() as vml:
        run_sft(tiny_model_dir, arithmetic_parquet, tmp_path / "sft", template=get_template("answer_tag"),
                settings=WARM_START, seed=0, dtype="float32")
    assert not vml.calls, dict(vml.calls)


def test_the_probe_sees_vml_functions():
    """What the tests above would see if the code went back to torch's functions or the foreach AdamW."""
    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.ones(2)
    with VMLCalls() as vml:
        torch.ones(3).exp()
        torch.optim.AdamW([parameter], foreach=True).step()
    assert vml.calls == {"exp": 1, "_foreach_sqrt": 1}


# The entry points of MKL's VML that ATen calls (ATen/cpu/vml.h: vm + s/d + the function), exported by libtorch_cpu.
VML_SYMBOLS = [f"vm{kind}{name}" for kind in "sd" for name in (
    "Acos", "Asin", "Atan", "Cos", "Erf", "Erfc", "ErfInv", "Exp", "Ln", "Log10", "Log2", "Sin", "Sqrt", "Tan", "Tanh")]


def vml_kernels() -> list[str]:
    """Every kernel of MKL's VML in torch's build (mkl_vml_kernel_<function>_<instruction set><accuracy>), however it
    is reached: among them every function of libtorch_cpu holding an approximate instruction (rcpps, rsqrtps) but
    MKL's sparse BLAS (benchmarks/approximate_instructions.py), whose bits each CPU vendor's hardware decides."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    symbols = subprocess.run(["nm", str(library)], capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r" [Tt] (mkl_vml_kernel_[sdcz][A-Z]\w*)$", symbols, re.MULTILINE)))


DRIVER = """
import json, sys
from pathlib import Path
from kalmanrl.runtime.cpu import pin_cpu_dispatch
pin_cpu_dispatch()
import torch
from kalmanrl.configuration.settings import Sft
from kalmanrl.data.prompts import get_template
from kalmanrl.jobs.sft import run_sft
from kalmanrl.jobs.trainer import train
model, data, out = map(Path, sys.argv[1:4])
torch.ones(8).exp()  # the one VML call expected: the breakpoints work
run_sft(model, data, out / "sft", template=get_template("answer_tag"), seed=0, dtype="float32",
        settings=Sft(**json.loads(sys.argv[4])))
for algorithm, settings in json.loads(sys.argv[5]).items():
    train(out / "sft", data, out / algorithm, settings=settings)
"""


# Run by gdb once libtorch_cpu is mapped: a breakpoint at the address of each symbol of `symbols_file` that counts its
# hits and lets the program go on (address breakpoints: gdb looks no symbol up again at each later library load).
GDB_PROBE = """
import json
import gdb

hits = {}


class Count(gdb.Breakpoint):
    def __init__(self, symbol):
        super().__init__(f"*{int(gdb.parse_and_eval(f'(long) &{symbol}')):#x}", internal=True)
        self.symbol = symbol

    def stop(self):
        hits[self.symbol] = hits.get(self.symbol, 0) + 1
        return False


counters = [Count(symbol) for symbol in json.load(open(symbols_file))]
gdb.execute("delete")  # the catchpoint that stopped here
gdb.events.exited.connect(lambda event: print("VML hits: " + json.dumps(hits), flush=True))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gdb") is None or shutil.which("nm") is None, reason="gdb or nm is not installed")
def test_mkls_vector_math_is_never_entered_by_a_warm_start_or_rl_steps(tmp_path, tiny_model_dir,
                                                                        arithmetic_parquet):
    """The dispatch-mode tests above see the functions Python calls, not those a kernel calls inside (logsumexp's exp,
    say). Here a breakpoint on every VML entry point and every VML kernel counts what a warm start and a step of GRPO,
    KRPO and KPO (sampling, scoring, update, AdamW) enter: only the driver's own exp, and its one kernel."""
    runs = {algorithm: train_settings(algorithm) for algorithm in ("grpo", "krpo", "kpo")}
    kernels = vml_kernels()
    assert len(kernels) > 100 and any(kernel.startswith("mkl_vml_kernel_sExp_") for kernel in kernels), kernels[:10]
    (tmp_path / "symbols.json").write_text(json.dumps(VML_SYMBOLS + kernels))
    (tmp_path / "probe.py").write_text(GDB_PROBE)
    (tmp_path / "gdb").write_text("\n".join([
        "set pagination off", "catch load libtorch_cpu", "run",  # stops once torch's library is mapped
        f"python symbols_file = {str(tmp_path / 'symbols.json')!r}", f"source {tmp_path / 'probe.py'}", "continue"]))
    (tmp_path / "driver.py").write_text(DRIVER)
    done = subprocess.run(["gdb", "-q", "-batch", "-x", str(tmp_path / "gdb"), "--args", sys.executable,
                           str(tmp_path / "driver.py"), str(tiny_model_dir), str(arithmetic_parquet), str(tmp_path),
                           json.dumps(dataclasses.asdict(WARM_START)), json.dumps(runs)],
                          capture_output=True, text=True, timeout=1200)
    assert "exited normally" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    hits = json.loads(re.search(r"^VML hits: (.*)$", done.stdout, re.MULTILINE).group(1))
    assert hits.pop("vmsExp") == 1, hits
    assert len(hits) == 1 and next(iter(hits)).startswith("mkl_vml_kernel_sExp_"), hits
