"""The public surface: what `import jaxmem` offers is deliberate, grouped and documented."""

import importlib.metadata
import inspect
import pathlib
import tomllib

import jaxmem

TOP = {
    # param transforms
    "ParamTransform", "EmptyState", "MaskedState", "PartitionState", "chain", "leafwise",
    "masked", "partition", "select", "transform",
    # pytrees of params
    "Compressed", "is_compressed", "leaves_with_paths", "map_with_path", "path_str",
    # quantization
    "QArray", "QATWeights", "dequantize_params", "input_hessians", "qat_weights",
    "quantize_dynamic_int8", "quantize_gptq", "quantize_hqq", "quantize_int4", "quantize_int8",
    "quantize_weights", "set_act_bits",
    # calibration
    "InputScale", "InputStats", "calibrate_layers", "fold_input_scales", "input_stats",
    # pruning and sparse storage
    "SparseArray", "gradual_prune", "keep_masks", "magnitude_prune", "nm_prune",
    "prune_sparsegpt", "prune_wanda", "sparsify",
    # running and sharding
    "apply", "merge_compressed", "partition_specs",
    # function transforms and training
    "StepState", "data_parallel", "init_step_state", "remat", "scan_layers", "train_step",
    "fsdp_specs", "fsdp_state_specs", "fsdp_train_step", "BlockQArray",
    # adapters
    "LoRAWeight", "add_lora", "lora_trainable", "merge_lora",
    # memory and checkpoints
    "CheckpointManager", "MemoryReport", "memory_report", "tree_bytes",
}

NAMESPACES = {
    "ops": {
        "awq_scales", "dequantize", "fake_quantize", "fake_quantize_activations", "gptq_kernel",
        "hadamard", "hadamard_matrix", "hqq_quantize", "int8_dot_route", "kernel_info",
        "KernelInfo", "magnitude_mask", "native_kernels", "nm_mask", "pack_ints", "quantize",
        "quantize_activations", "quantized_conv", "quantized_dot_general", "quantized_einsum",
        "quantized_take", "row_stats", "smoothquant_scales", "sparse_pack", "sparse_unpack",
        "sparsegpt_kernel", "unpack_ints", "wanda_mask",
    },
    "sparsity": {
        "GradualPruneState", "KeepMasksState", "apply_masks", "magnitude_masks", "mask_sparsity",
        "nm_masks", "sparsity_schedule", "tree_sparsity",
    },
    "optim": {
        "ScaleByAdam8bitState", "ScaleByLion8bitState", "adam_8bit", "adamw_8bit",
        "block_dequantize", "block_quantize", "dynamic_code", "lion_8bit", "max_code_gap",
        "row_block", "scale_by_adam_8bit", "scale_by_lion_8bit",
    },
    "train": {"distill_loss", "fake_quantize_linen_inputs", "feature_distill_loss", "kd_loss",
              "linear_cross_entropy"},
    "memory": {
        "REMAT_OFFLOAD_POLICIES", "REMAT_POLICIES", "Candidate", "MemoryPlan", "MemoryProfile",
        "allocate_bits", "checkpoint_name", "compiled_profile", "jaxpr_flops", "leaf_sensitivity",
        "memory_candidates", "memory_profile", "mix_leaves", "offload_supported", "plan_memory",
        "plan_training",
        "remat_policy",
    },
    "distributed": {
        "DataParallel", "FSDPTrainStep", "ProcessInfo", "initialize", "mesh_from_axes", "shutdown",
    },
    "checkpoint": {
        "CheckpointCorruptError", "CheckpointFallbackWarning", "CheckpointLockedError",
        "abstract_target", "checkpoint_layout", "register_checkpoint_type",
    },
}


def _public(module) -> set[str]:
  return {
      n for n in dir(module)
      if not n.startswith("_") and not inspect.ismodule(getattr(module, n))
  }


def test_top_level_is_the_everyday_names_plus_namespaces():
  # Subpackages (e.g. jaxmem.models) appear as attributes once something imports them.
  names = _public(jaxmem)
  assert names == TOP, f"added: {sorted(names - TOP)}; missing: {sorted(TOP - names)}"
  assert set(jaxmem.__all__) == TOP | set(NAMESPACES) | {"testing"}
  assert len(jaxmem.__all__) == len(set(jaxmem.__all__))


def test_each_namespace_holds_exactly_its_names():
  for ns, expected in NAMESPACES.items():
    module = getattr(jaxmem, ns)
    assert _public(module) == expected == set(module.__all__), ns


def test_one_name_per_idea_each_in_one_place():
  places: dict[str, list[str]] = {}
  for n in TOP:
    places.setdefault(n, []).append("jaxmem")
  for ns, names in NAMESPACES.items():
    for n in names:
      places.setdefault(n, []).append(f"jaxmem.{ns}")
  twice = {n: p for n, p in places.items() if len(p) > 1}
  assert not twice, twice
  objects = [getattr(jaxmem, n) for n in TOP] + [
      getattr(getattr(jaxmem, ns), n) for ns, names in NAMESPACES.items() for n in names]
  callables = [o for o in objects if callable(o)]
  assert len({id(o) for o in callables}) == len(callables), "one object under two names"


def test_every_public_function_and_class_has_a_docstring():
  items = [("jaxmem", n, getattr(jaxmem, n)) for n in TOP] + [
      (f"jaxmem.{ns}", n, getattr(getattr(jaxmem, ns), n))
      for ns, names in NAMESPACES.items() for n in names]
  for where, name, obj in items:
    if inspect.isfunction(obj) or inspect.isclass(obj):
      assert (obj.__doc__ or "").strip(), f"{where}.{name} has no docstring"
      assert obj.__module__.startswith("jaxmem"), name
  for ns in NAMESPACES:
    assert (getattr(jaxmem, ns).__doc__ or "").strip(), ns


def test_version_comes_from_pyproject():
  pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
  expected = tomllib.loads(pyproject.read_text())["project"]["version"]
  assert jaxmem.__version__ == importlib.metadata.version("jaxmem") == expected
