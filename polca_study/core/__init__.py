"""The math of POLCA (projected loss change allocation), and nothing else.

This layer knows nothing of Hydra, W&B, pandas, files or any particular model: tensors
and loss functions in, tensors out. Parameters are flat vectors θ (d,), directions the
columns of a (d, m) matrix (or `Coordinates`), and a loss function maps θ to per-example
losses (n,). Outputs keep the dtype and device of the inputs. One concept per module:

- `checks`: the input checks, and the option sets they accept.
- `directions`: flat parameter vectors, directions in parameter space, projections.
- `basis`: the Hessian basis (the paper's Algorithm 1: Lanczos on `P H P`).
- `derivatives`: directional derivatives `<b, ∇L(x;θ)>` and curvatures `bᵀH(x;θ)b`.
- `decompose`: POLCA values of every example along every direction, step by step.
- `module_loss`: an `nn.Module`, a batch and a per-token loss as a loss function of θ,
  with the per-sample reverse route for first-order terms.
- `per_sample`: each layer type's per-sequence parameter gradients, projected.

The package imports none of them here, so that `polca_study.core.checks` (which the
config schemas read) stays light: importing `basis` loads scipy. Import from the modules,
or from the public face `polca_study.polca`. The imports among the modules form no cycle:
directions and per_sample import no other; checks imports directions; basis imports
checks and directions; derivatives those and basis; decompose checks, directions and
derivatives; module_loss checks, directions, derivatives and per_sample.
"""
