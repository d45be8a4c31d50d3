"""The public surface: what `import jaxmem` offers is deliberate and documented."""

import inspect

import jaxmem

EXPECTED = {
    # core
    "Compressed", "EmptyState", "MaskedState", "PartitionState", "ParamTransform", "chain",
    "is_compressed", "leafwise", "leaves_with_paths", "map_with_path", "masked", "partition",
    "select", "transform",
    # memory
    "MemoryReport", "memory_report", "tree_bytes", "MemoryProfile", "compiled_profile",
    "memory_profile", "Candidate", "MemoryPlan", "jaxpr_flops", "memory_candidates",
    "plan_memory",
    # quantization and execution
    "QArray", "dequantize", "pack", "quantize", "unpack", "dequantize_params",
    "quantize_dynamic_int8", "quantize_int8", "quantize_weights", "quantize_int4",
    "quantize_grouped", "gptq_kernel", "input_hessians", "quantize_gptq", "leaf_sensitivity",
    "mix_leaves", "mixed_precision", "apply", "merge_compressed", "int8_dot_route",
    "quantize_activations", "quantized_conv", "quantized_dot_general", "quantized_einsum",
    "quantized_take", "set_act_bits", "partition_specs",
    # pruning and sparse storage
    "GradualPruneState", "KeepMasksState", "gradual_prune", "keep_masks", "mask_sparsity",
    "sparsity_schedule", "apply_masks", "magnitude_mask", "magnitude_masks", "magnitude_prune",
    "nm_mask", "nm_masks", "nm_prune", "sparsify", "tree_sparsity", "SparseArray",
    "sparse_pack", "sparse_unpack",
    # QAT and distillation
    "QATWeights", "fake_quant_activations", "fake_quantize", "fake_quantize_activations",
    "qat_weights", "DistillState", "distill_init", "distill_train_step",
    "feature_distill_loss", "kd_loss",
    # function transforms and parallelism
    "REMAT_OFFLOAD_POLICIES", "REMAT_POLICIES", "checkpoint_name", "offload_supported", "remat",
    "remat_policy", "scan_layers", "DataParallel", "TrainState", "data_parallel",
    "init_train_state", "mesh_from_axes", "train_step", "ProcessInfo", "initialize", "shutdown",
    # checkpoints
    "CheckpointCorruptError", "CheckpointFallbackWarning", "CheckpointLockedError",
    "CheckpointManager", "abstract_target", "checkpoint_layout", "register_checkpoint_type",
    # test helpers
    "testing",
}


def test_public_names_are_exactly_the_documented_surface():
  # Subpackages (e.g. jaxmem.models) appear as attributes once something imports them.
  public = {
      n for n in dir(jaxmem)
      if not n.startswith("_") and (n == "testing" or not inspect.ismodule(getattr(jaxmem, n)))
  }
  assert public == EXPECTED, (
      f"added: {sorted(public - EXPECTED)}; missing: {sorted(EXPECTED - public)}"
  )


def test_every_public_function_and_class_has_a_docstring():
  for name in sorted(EXPECTED):
    obj = getattr(jaxmem, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
      assert (obj.__doc__ or "").strip(), f"jaxmem.{name} has no docstring"
      assert obj.__module__.startswith("jaxmem"), name


def test_version_comes_from_pyproject():
  import importlib.metadata
  import pathlib
  import tomllib

  pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
  expected = tomllib.loads(pyproject.read_text())["project"]["version"]
  assert jaxmem.__version__ == importlib.metadata.version("jaxmem") == expected
