"""mesa_jax's machinery: residuals shared between ops, the interception scope, the sites (one
handler per kind), the stores (Linen's "mesa" collection, NNX's MesaStat) and compress. Not a
public API: mesa_jax's top level, mesa_jax.nn, mesa_jax.nnx and mesa_jax.ops are."""
