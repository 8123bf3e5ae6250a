"""Local reconstruction of one pruned decoder block (optional stage of the sequential prune; `prune.reconstruct`).

After a block is pruned (and its kept weights updated), a first-order optimiser re-fits the kept weights of its
Linears so that the pruned block reproduces the dense block's outputs on the same calibration inputs:

    min  sum_n ||block_W(x_n) - block_dense(x_n)||^2   over the kept weights, the mask fixed,

with Adam on minibatches of `batch_size` calibration windows for `steps` steps, the pruned weights' gradients zeroed
(so Adam never moves them off 0.0: exact counts and N:M survive). It follows the block-wise reconstruction idea of
arXiv 2510.14444 and Wanda++'s regional optimisation (arXiv 2503.04992); the target is the dense block on the
pruned model's own inputs (what the sequential pass has anyway), the optimiser and schedule are ours. Everything
else in the block (norms, biases) stays as it is. Works in fp32 master weights whatever the model's dtype.
Cost: each step is one forward and one backward of one block on `batch_size` windows, about 3 x batch_size / n of the
block's share of a dense forward over the n calibration windows, so steps x 3 x batch_size / n dense-forward
equivalents for the whole model.
"""

from absorbdeploy.blocks import prunable_linears


def reconstruct(block, inputs, targets, block_kwargs, steps: int, lr: float, batch_size: int, seed: int = 0) -> dict:
    """Re-fit `block`'s kept Linear weights in place. inputs, targets: [n, T, d] (any float dtype, any device: each
    minibatch moves to the block's device); block_kwargs(batch, seqlen) -> the keyword arguments a decoder block takes
    (BlockRunner.block_kwargs). Returns {"loss_first", "loss_last"}: the first and last minibatch's mean squared error
    relative to the mean square of the block's own contribution (target - input) on it."""
    import torch

    linears = [m for _, m in prunable_linears(block)]
    device = linears[0].weight.device
    dtype = linears[0].weight.dtype
    saved = {id(p): p.requires_grad for p in block.parameters()}
    before = [m.weight.detach().clone() for m in linears]
    keeps = [m.weight != 0 for m in linears]
    if dtype != torch.float32:
        block.float()
    for p in block.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in linears]
    for w in weights:
        w.requires_grad_(True)
    optimiser = torch.optim.Adam(weights, lr=lr)
    order = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed))
    losses = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                start = (step * batch_size) % inputs.shape[0]
                pick = order[start : start + batch_size]
                x = inputs[pick].to(device, torch.float32)
                t = targets[pick].to(device, torch.float32)
                kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else
                          tuple(e.float() for e in v) if isinstance(v, tuple) else v
                          for k, v in block_kwargs(x.shape[0], x.shape[1]).items()}
                y = block(x, **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                loss = (y - t).square().mean()
                optimiser.zero_grad(set_to_none=False)
                loss.backward()
                for w, keep in zip(weights, keeps):
                    w.grad.mul_(keep)
                optimiser.step()
                if step in (0, steps - 1):
                    losses.append(float(loss.detach()) / max(float((t - x).square().mean()), 1e-30))
    finally:
        for p in block.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
        if dtype != torch.float32:
            block.to(dtype)
    with torch.no_grad():
        for m, keep, old in zip(linears, keeps, before):
            w = m.weight.data
            w.mul_(keep)
            lost = keep & (w == 0)  # a kept weight that rounded to 0.0 in the model's dtype keeps its old value
            w[lost] = old[lost]
    return {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
