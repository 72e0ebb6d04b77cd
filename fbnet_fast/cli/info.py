"""``fbnet-fast info ARCH``: per-layer blocks, output shapes, MACs and parameters."""
from __future__ import annotations

from ..nn.architecture import resolve_arch
from ..nn.models import count_costs


def register(sub) -> None:
    p = sub.add_parser("info", help="print an architecture's layers, MACs and parameters")
    p.add_argument("arch", help="zoo name (fbnet_a, fbnet_c, ...), architecture JSON file, "
                                "or short string 'r224_w1.0_h1984:k3_e1,...'")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=run)


def run(args) -> int:
    arch = resolve_arch(args.arch)
    rows = count_costs(arch, args.num_classes)
    s = arch.space
    print(f"architecture: {arch.name or args.arch}  (input {s.resolution}x{s.resolution}, "
          f"width {s.width}, {args.num_classes} classes)")
    print(f"{'layer':<6} {'block':<10} {'output (C, H, W)':<18} {'MACs (M)':>10} {'params':>10}")
    for r in rows:
        shape = "x".join(str(v) for v in r.out_shape)
        print(f"{r.name:<6} {r.block:<10} {shape:<18} {r.macs / 1e6:>10.2f} {r.params:>10,}")
    macs, params = sum(r.macs for r in rows), sum(r.params for r in rows)
    print(f"{'total':<6} {'':<10} {'':<18} {macs / 1e6:>10.1f} {params:>10,}")
    return 0
