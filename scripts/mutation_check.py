"""Mutation check: break each CM rule in turn and confirm the math tests catch it.

Run from the repository root: ``python scripts/mutation_check.py``. Each line prints CAUGHT or
MISSED; every mutation must be CAUGHT. Sources are restored after each run.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
root = os.path.join(ROOT, "src", "compositional_muon") + "/"
muts = [
    (
        "cm.py",
        "    dA = _left(roots.post_b * k, Za) if post else Za * k",
        "    dA = Za * k",
        "drop post-whitening on A",
    ),
    ("cm.py", "        scale = eta / 2\n", "        scale = eta\n", "half_split scale eta"),
    (
        "cm.py",
        "    Ga = (Aw @ Aw.mT).unflatten(1, (hkv, -1)).sum(2)",
        "    Ga = (Aw @ Aw.mT).unflatten(1, (hkv, -1)).mean(2)",
        "group Gram mean not sum",
    ),
    (
        "cm.py",
        "        return (U * (s + cfg.lam).rsqrt().unsqueeze(-2)) @ U.mT",
        "        return (U * (s + 1e-9).rsqrt().unsqueeze(-2)) @ U.mT",
        "root ignores lam",
    ),
    (
        "cm.py",
        "            Za = msign(Xa.reshape(L, H * d, D), **ms).reshape(L, hkv, G, d, D)",
        "            Za = msign(Xa, **ms)",
        "hybrid per head",
    ),
    ("cm.py", "        scale = eta\n", "        scale = eta / 2\n", "joint scale eta/2"),
    (
        "inverse_root.py",
        "    chol, info = torch.linalg.cholesky_ex(g.to(work) + lam * eye)",
        "    chol, info = torch.linalg.cholesky_ex(g.to(work) + 1e-9 * eye)",
        "cholesky root ignores lam",
    ),
    (
        "cm.py",
        "        return _Roots(inv_b, inv_a, inv_b.mT, inv_a.mT, grams=(Ga, Gb))",
        "        return _Roots(inv_b, inv_a, inv_b, inv_a, grams=(Ga, Gb))",
        "cholesky post factor not L^-T",
    ),
    (
        "cm.py",
        "        r_a = (sq_a / d + cfg.lam).rsqrt()[..., None, None]",
        "        r_a = (sq_a + cfg.lam).rsqrt()[..., None, None]",
        "isotropic no /d",
    ),
    (
        "cm.py",
        "    Xa = _left(R_b, Ua_g.to(work)) if pre else Ua_g.to(work)",
        "    Xa = _left(R_a, Ua_g.to(work)) if pre else Ua_g.to(work)",
        "pre-whiten by own Gram",
    ),
    ("cm.py", "        dA = dA * (_norm_ratio(Za, dA) * -scale)", "        dA = dA * -scale", "no renorm on A"),
    (
        "cm.py",
        "    new_ma = torch.add(ga.to(ma.dtype), ma, alpha=beta)",
        "    new_ma = torch.add(ga.to(ma.dtype), ma, alpha=1.0)",
        "momentum beta ignored",
    ),
    ("connection.py", "    Q_new = Q + dQ.to(Q.dtype)", "    Q_new = Q - dQ.to(Q.dtype)", "connection sign flip"),
    (
        "connection.py",
        "        denom = (sb + lam).unsqueeze(-1) * sa.unsqueeze(-2) + sb.unsqueeze(-1) * (sa + lam).unsqueeze(-2)",
        "        denom = sb.unsqueeze(-1) * sa.unsqueeze(-2) * 2",
        "scale_aware drops lam",
    ),
    (
        "connection.py",
        "            num = _inner(Pg, Ag).sum(-1) - _inner(Q, B)",
        "            num = _inner(Pg, Ag).sum(-1) + _inner(Q, B)",
        "frob scalar sign",
    ),
    (
        "msign.py",
        "        Q = torch.baddbmm(A, A, A, beta=b, alpha=c)",
        "        Q = torch.baddbmm(A, A, A, beta=b * 0.99, alpha=c * 0.99)",
        "NS polynomial off",
    ),
    ("msign.py", "    keep = (S > tol) & (S > 0)", "    keep = S >= 0", "svd keeps zero svals"),
    ("cm.py", "    Zn = Zw / (new_v.sqrt() + eps)", "    Zn = Zw", "normuon transform drops the row normalization"),
    (
        "inverse_root.py",
        "        t = 1.5 * eye - 0.5 * (z @ y)",
        "        t = 1.5 * eye - 0.5 * (y @ y)",
        "newton root wrong",
    ),
]
for f, old, new, name in muts:
    p = root + f
    src = open(p).read()
    assert src.count(old) >= 1, (name, old)
    open(p, "w").write(src.replace(old, new, 1))
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-x",
                "-q",
                "tests/test_cm_invariants.py",
                "tests/test_cm_api.py",
                "tests/test_msign.py",
                "tests/test_inverse_root.py",
                "tests/test_cm_transform.py",
                "-p",
                "no:cacheprovider",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        last = r.stdout.strip().splitlines()[-1]
        print(("CAUGHT " if r.returncode else "MISSED ") + name + " :: " + last)
    finally:
        open(p, "w").write(src)
