"""Flax glue: everything in jaxmem that reaches into ``flax.linen`` / ``flax.nnx`` lives here.

* :mod:`.apply`: :func:`jaxmem.apply` and :func:`jaxmem.merge_compressed` (Linen layers run
  through ``nn.intercept_methods``, NNX layers swapped for quantized twins, lifted
  transforms over stacked compressed params);
* :mod:`.calibration`: capturing layer inputs of a Linen model on calibration batches
  (:func:`jaxmem.input_hessians`);
* :mod:`.qat`: fake-quantizing the inputs of chosen Linen layers during training;
* :mod:`.lifted`: what :func:`jaxmem.remat` does for Linen module classes and NNX modules.

The array math (``qarray``, ``qdot``, the quantizers, pruning, GPTQ's solve, ...) imports no
Flax; a test checks that no module outside this package does.
"""
