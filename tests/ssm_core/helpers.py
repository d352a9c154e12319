"""Shared by the ssm_core tests (and the SSD kernel test): random inputs, relative error, streaming."""
import torch


def scan_inputs(b=2, d=6, L=19, n=5, groups=None, dtype=torch.float32, full=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (b, n, L) if groups is None else (b, groups, n, L)
    t = dict(u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-torch.rand(d, n, generator=g) * 2 - 0.1,
             B=r(*bc), C=r(*bc))
    if full:
        t.update(D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.3, h0=r(b, d, n))
    return {k: v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in t.items()}


def ssd_inputs(b=2, L=45, h=4, p=6, g=2, n=5, dtype=torch.float64, full=True, D_hdim=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    t = dict(x=r(b, L, h, p), dt=r(b, L, h) - 1.0, A=-torch.rand(h, generator=gen, dtype=torch.float64) * 2 - 0.2,
             B=r(b, L, g, n), C=r(b, L, g, n))
    if full:
        t.update(D=r(h, p) if D_hdim else r(h), z=r(b, L, h, p), dt_bias=r(h) * 0.3, initial_states=r(b, h, p, n))
    return {k: v.to(dtype) if k in ("x", "B", "C", "z") else v for k, v in t.items()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def stream(module, x, sizes):
    """`module` streamed over x in chunks of the given sizes, cycled until x ends; the outputs joined."""
    state = module.init_state(x.shape[0])
    outs, i, k = [], 0, 0
    while i < x.shape[1]:
        n = sizes[k % len(sizes)]
        y, state = module.stream(x[:, i:i + n], state)
        outs.append(y)
        i, k = i + n, k + 1
    return torch.cat(outs, 1)


def stream_in_chunks(mixer, x, sizes):
    """`mixer` streamed over x in chunks of exactly these sizes: (outputs joined, final state)."""
    state = mixer.init_state(x.shape[0])
    outs, s = [], 0
    for n in sizes:
        y, state = mixer.stream(x[:, s:s + n], state)
        outs.append(y)
        s += n
    assert s == x.shape[1]
    return torch.cat(outs, 1), state
