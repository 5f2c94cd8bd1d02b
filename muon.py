"""
Muon (MomentUm Orthogonalized by Newton-Schulz) for the 2-D weights inside the blocks; model.configure_optimizers
pairs it with AdamW for everything else. Each step: Nesterov momentum on the gradient, then the update is replaced
by the nearest (semi-)orthogonal matrix, computed with a few Newton-Schulz iterations, so every direction of the
matrix moves by about the same amount.

The same rule as torch.optim.Muon (momentum buffer B = mu B + g, update g + mu B, five quintic iterations in
bfloat16, lr scaled by sqrt(max(1, rows / cols)), decoupled weight decay lr * wd); tests/test_fast_paths.py checks
they agree. The iterations run in bfloat16 only where the device computes it natively, in float32 elsewhere
(runtime.choose_ns_dtype: a CPU without AVX512-BF16 or AMX emulates bfloat16 matmuls, several times slower). The difference is speed: matrices of one shape are orthogonalised together, as one batch. A GPT has only
four shapes of block matrix however deep it is (three once the tall ones are transposed), so a step runs 3 x 10
batched matmuls instead of 4 x n_layer x 15 small ones: on the CPU baby recipe a step takes 6.4-7.4 ms instead of
torch.optim.Muon's 9.7-11.3 (docs/BENCHMARKS.md), and on a GPU there are that many fewer kernel launches.
"""

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # a quintic whose slope at 0 is as steep as it can be and still converge


def orthogonalize(X, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """a batch of wide matrices (n, rows <= cols) -> approximately U V^T of each one's SVD: Newton-Schulz in `dtype`,
    each iteration two batched matmuls with their scalars fused in (baddbmm)"""
    a, b, c = NS_COEFFICIENTS
    X = X.to(dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT  # the Gram matrix of the shorter side
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # aX + (bA + cA^2)X
    return X


class Muon(torch.optim.Optimizer):

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5, ns_dtype=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # None: bfloat16 where the device computes it natively, else float32 (runtime.ns_dtype)
        if any(p.dim() != 2 for g in self.param_groups for p in g['params']):
            raise ValueError("Muon orthogonalises 2-D weight matrices only; give the other parameters to AdamW")
        # like fused AdamW, step() reads found_inf (and grad_scale) set by runtime.step_optimizers or a GradScaler
        self._step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):  # closure: the Optimizer interface (checkpoint loading calls it); unused
        found_inf, grad_scale = getattr(self, 'found_inf', None), getattr(self, 'grad_scale', None)
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            grads, go, momentum = [p.grad for p in params], None, group['momentum']
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            if found_inf is not None:  # skipped on the device, no host sync: zero gradients, momentum 1, no update
                go = found_inf.to(params[0].device) == 0
                grads = [torch.where(go, g, 0.0) for g in grads]
                momentum = torch.where(go, momentum, 1.0)
            bufs = [self.state[p].setdefault('momentum_buffer', torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=group['momentum'])  # Nesterov
            if group['weight_decay']:
                decay = 1 - group['lr'] * group['weight_decay']
                torch._foreach_mul_(params, decay if go is None else torch.where(go, decay, 1.0))
            batches = {}  # tall matrices are transposed to wide ones, so (512, 128) and (128, 512) share a batch
            for p, u in zip(params, updates):
                tall = p.size(0) > p.size(1)
                batches.setdefault(tuple((u.mT if tall else u).shape), []).append((p, u.mT if tall else u, tall))
            if self.ns_dtype is None:
                from runtime import ns_dtype
                self.ns_dtype = ns_dtype(params[0].device)
            for batch in batches.values():
                O = orthogonalize(torch.stack([u for _, u, _ in batch]), group['ns_steps'], dtype=self.ns_dtype)
                for (p, _, tall), o in zip(batch, O.unbind(0)):
                    # as in torch.optim.Muon: a tall matrix's orthogonal update is smaller per entry, scale it up
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    o = o if go is None else o * go
                    p.add_((o.mT if tall else o).to(p.dtype), alpha=-group['lr'] * scale)
