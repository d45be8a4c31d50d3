"""Flax glue lives in jaxmem/_src/flax/ only, mirrors the installed flax; its rules are strict."""

import ast
import importlib.metadata
import inspect
import pathlib
import re
import tomllib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmem
from jaxmem._src.flax import apply as flax_apply

ROOT = pathlib.Path(jaxmem.__file__).resolve().parent


def _imports_flax(path: pathlib.Path) -> list[int]:
  lines = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "flax" for a in node.names):
      lines.append(node.lineno)
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (
        (node.module or "").split(".")[0] == "flax"):
      lines.append(node.lineno)
  return lines


def test_only_the_flax_subpackage_and_the_models_import_flax():
  glue = ROOT / "_src" / "flax"
  offenders = {
      str(p.relative_to(ROOT)): lines
      for p in sorted(ROOT.rglob("*.py"))
      if glue not in p.parents and (ROOT / "models") not in p.parents
      for lines in [_imports_flax(p)] if lines
  }
  assert not offenders, f"flax imported outside jaxmem/_src/flax/: {offenders}"


def _version(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_installed_flax_is_within_the_tested_bounds():
  deps = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["dependencies"]
  spec = next(d for d in deps if re.match(r"flax\b", d))
  lower = re.search(r">=\s*([\d.]+)", spec).group(1)
  upper = re.search(r"<\s*([\d.]+)", spec).group(1)
  installed = _version(importlib.metadata.version("flax"))
  assert _version(lower) <= installed < _version(upper), (spec, installed)


@pytest.mark.parametrize("cls", list(flax_apply._NNX_LAYERS), ids=lambda c: c.__name__)
def test_nnx_twins_take_the_arguments_of_the_layers_they_mirror(cls):
  _, methods = flax_apply._NNX_LAYERS[cls]
  for name, twin in methods.items():
    ours = list(inspect.signature(twin).parameters)
    theirs = list(inspect.signature(getattr(cls, name)).parameters)
    assert ours == theirs, (cls.__name__, name, ours, theirs)


@pytest.mark.parametrize(
    "equation, lhs_shape, kernel_shape, expected",
    [
        ("abc,cde->abde", (2, 3, 4), (4, 5, 6), (1, 1, 5, 6)),
        ("...c,cd->...d", (2, 3, 4), (4, 5), (1, 1, 5)),
        ("bsd,dhk->bshk", (2, 3, 8), (8, 2, 4), (1, 1, 2, 4)),
        ("...hd,hdf->...f", (2, 5, 3, 4), (3, 4, 7), (1, 1, 7)),
        ("ab,...b->...a", (2, 3), (4, 2, 3), (4, 2, 1)),  # the kernel's own ellipsis
        ("...a,...ab->...b", (2, 3, 4), (3, 4, 5), (1, 3, 5)),
        ("nd,dh->hn", (3, 4), (4, 5), (5, 1)),  # output axes reordered
    ],
)
def test_einsum_bias_broadcasts_over_the_kernels_output_axes(
    equation, lhs_shape, kernel_shape, expected
):
  assert flax_apply._einsum_bias_shape(equation, len(lhs_shape), kernel_shape) == expected


def test_einsum_with_bias_matches_flax_for_a_broadcast_equation():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  model = nn.Einsum((8, 2, 4), "...d,dhk->...hk")
  v = model.init(jax.random.key(1), x)
  v = {"params": {**v["params"], "bias": jax.random.normal(jax.random.key(2), (2, 4))}}
  q = {"params": jaxmem.transform(jaxmem.quantize_int8(), v["params"])}
  want = model.apply({"params": {**v["params"], "kernel": q["params"]["kernel"].materialize()}}, x)
  np.testing.assert_allclose(jaxmem.apply(model, q, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["a->b", "ab,bc,cd->ad"])
def test_einsum_equation_errors_are_flaxs(bad):
  with pytest.raises(ValueError, match="einsum_str"):
    flax_apply._einsum_bias_shape(bad, 2, (2, 2))


class _TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="up")(nn.Dense(4, name="in")(x))


def test_fake_quantize_linen_inputs_pattern_matching_no_layer_is_an_error():
  model, x = _TwoDense(), jnp.ones((2, 4))
  v = model.init(jax.random.key(0), x)
  with jaxmem.train.fake_quantize_linen_inputs(where="up"):
    model.apply(v, x)
  with pytest.raises(ValueError, match=r"'Up' matches no layer of Dense.*Paths are: in, up"):
    with jaxmem.train.fake_quantize_linen_inputs(where=["up", "Up"]):
      model.apply(v, x)


def test_input_hessians_pattern_error_lists_the_dense_kernels():
  model, x = _TwoDense(), jnp.ones((2, 4))
  v = model.init(jax.random.key(0), x)
  h = jaxmem.input_hessians(model, v, [(x,)], where="up/kernel")
  assert list(h) == ["up/kernel"]
  with pytest.raises(ValueError, match=r"'down/kernel' matches no Dense kernel.*in/kernel, up"):
    jaxmem.input_hessians(model, v, [(x,)], where=["up/kernel", "down/kernel"])


def test_one_path_spelling_for_linen_modules_nnx_state_and_param_trees():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs)])

  state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
  paths = [jaxmem.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert paths == ["layers/0/bias", "layers/0/kernel"]
  assert jaxmem.path_str(("layers", 0, "kernel")) == "layers/0/kernel"
