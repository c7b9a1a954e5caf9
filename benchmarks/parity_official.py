"""Numerical parity of ``dreamidv_core`` against a checkout of the official DreamID-V code.

    python benchmarks/parity_official.py --official /path/to/DreamID-V [--only dit,vae,unipc,t5]
        [--device cpu|cuda] [--weights-dit dreamidv.pth] [--weights-vae Wan2.1_VAE.pth]

The official modules (``dreamidv_wan/modules/{model,projector,vae,t5}.py`` and
``dreamidv_wan/utils/fm_solvers_unipc.py``) are imported at run time from the given checkout; the
checkout is never modified. The needed files are copied into a temporary package with three small
text patches (``torch.cuda.amp`` -> an autocast shim, where ``autocast(dtype=float32)`` means "run in
fp32" as on CUDA; ``t5.py``'s import-time ``torch.cuda.current_device()`` default -> ``'cpu'``), and
its ``attention.py`` / ``tokenizers.py`` are replaced by shims: ``flash_attention`` becomes masked
``scaled_dot_product_attention`` in the input dtype (flash-attn itself would compute in bf16). If
``diffusers`` is not installed, minimal ConfigMixin / ModelMixin / SchedulerMixin stand-ins are put
into ``sys.modules``.

Checks (tiny random models unless real weights are given; same weights loaded into both sides):
  dit    DiT forward, fp32: conditional and zeroed-reference (identity-guidance) rows of one batched
         call, and the uncached pose-K/V path; bf16: ours in bf16 vs the official under bf16 autocast
         (the official bf16-vs-fp32 error is printed as a yardstick); bf16 STORAGE: the checkpoint loaded with
         ``load_dit``'s default (weights stored in bf16) vs the official under bf16 autocast. The official Projector hard-codes
         vid_dim=1536, so for the tiny model it is rebuilt with vid_dim=dim.
  unipc  final sample of our ``sample_unipc`` vs the official FlowUniPCMultistepScheduler step loop
         (12/20/50 steps, shift 5, state-dependent fake model) and the timesteps the model sees.
  vae    encode (chunked and one-shot) and decode (chunked and one-shot) vs the official WanVAE, fp32.
  t5     umT5 encoder: the official T5Encoder on 512-style padded ids + mask vs ours on the unpadded
         ids (weights written in the official layout and read back by our loader), fp32 and bf16.

Tolerances: max abs diff <= rel * max(1, scale), scale = max |official output|; rel is given per row.
Prints a table; exits 1 if any row FAILs.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PKG = "_dreamidv_official"
COPIED = ("modules/model.py", "modules/projector.py", "modules/vae.py", "modules/t5.py", "utils/fm_solvers_unipc.py")
AMP_IMPORT = ("import torch.cuda.amp as amp", "from . import _amp as amp")
PATCHES = {
    "modules/model.py": [AMP_IMPORT],
    "modules/vae.py": [AMP_IMPORT],
    "modules/t5.py": [("device=torch.cuda.current_device()", "device='cpu'")],
}
SHIMS = {
    "modules/_amp.py": '''
import functools, torch
DEVICE_TYPE = "cpu"
class autocast:
    """torch.cuda.amp.autocast stand-in on DEVICE_TYPE; dtype float32 means plain fp32 compute."""
    def __init__(self, enabled=True, dtype=torch.float16, cache_enabled=True):
        self.args, fp32 = (enabled, dtype), dtype == torch.float32
        self._ctx = torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16 if fp32 else dtype, enabled=enabled and not fp32)
    def __enter__(self):
        return self._ctx.__enter__()
    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            with autocast(*self.args):
                return fn(*a, **k)
        return wrapped
''',
    "modules/attention.py": '''
import torch
import torch.nn.functional as F
def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    """q/k/v [B, L, N, D]; keys at positions >= k_lens[b] are ignored, as in flash_attn_varlen_func."""
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None] < k_lens.to(k.device)[:, None])[:, None, None]
    if q_scale is not None:
        q = q * q_scale
    q, k, v = (u.to(q.dtype).transpose(1, 2) for u in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).type(q.dtype)
attention = flash_attention
''',
    "modules/tokenizers.py": "HuggingfaceTokenizer = None  # not needed for the parity checks\n",
}


def install_diffusers_shim() -> None:
    """Minimal stand-ins for the few diffusers names the official files import (only if diffusers is absent)."""
    if importlib.util.find_spec("diffusers") is not None:
        return
    import enum
    from dataclasses import dataclass

    class ConfigMixin:
        def register_to_config(self, **kwargs):
            self._config = {**getattr(self, "_config", {}), **kwargs}

        @property
        def config(self):
            return types.SimpleNamespace(**self._config)

    def register_to_config(init):
        sig = inspect.signature(init)

        @functools.wraps(init)
        def wrapper(self, *args, **kwargs):
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._config = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
            init(self, *args, **kwargs)
        return wrapper

    @dataclass
    class SchedulerOutput:
        prev_sample: torch.Tensor

    names = {
        "diffusers": {},
        "diffusers.configuration_utils": dict(ConfigMixin=ConfigMixin, register_to_config=register_to_config),
        "diffusers.models": {},
        "diffusers.models.modeling_utils": dict(ModelMixin=type("ModelMixin", (torch.nn.Module,), {})),
        "diffusers.schedulers": {},
        "diffusers.schedulers.scheduling_utils": dict(
            KarrasDiffusionSchedulers=enum.Enum("KarrasDiffusionSchedulers", "DDIMScheduler"),
            SchedulerMixin=type("SchedulerMixin", (), {}), SchedulerOutput=SchedulerOutput),
        "diffusers.utils": dict(deprecate=lambda *a, **k: None, is_scipy_available=lambda: False),
    }
    for name, attrs in names.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod


def stage_official(checkout: Path, tmp: Path) -> None:
    """Copy the needed official files into tmp/PKG (patched) and put tmp on sys.path."""
    src = checkout / "dreamidv_wan"
    if not src.is_dir():
        sys.exit(f"{checkout} does not look like a DreamID-V checkout (no dreamidv_wan/)")
    for sub in ("", "modules", "utils"):
        (tmp / PKG / sub).mkdir(parents=True, exist_ok=True)
        (tmp / PKG / sub / "__init__.py").write_text("")
    for rel in COPIED:
        text = (src / rel).read_text(encoding="utf-8")
        for old, new in PATCHES.get(rel, []):
            if old not in text:
                sys.exit(f"{src / rel}: expected to find {old!r}; the official code changed, update this script")
            text = text.replace(old, new)
        (tmp / PKG / rel).write_text(text, encoding="utf-8")
    for rel, text in SHIMS.items():
        (tmp / PKG / rel).write_text(text.lstrip(), encoding="utf-8")
    install_diffusers_shim()
    sys.path.insert(0, str(tmp))


def official(name: str):
    return importlib.import_module(f"{PKG}.{name}")


ROWS = []


def report(component, setting, ours, ref, rel):
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"{component} {setting}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    ROWS.append((component, setting, diff, scale, rel, diff <= rel * max(1.0, scale)))


# ----------------------------------------------------------------------------------------------- DiT
@torch.no_grad()
def check_dit(args, dev):
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    M, P = official("modules.model"), official("modules.projector")
    if args.weights_dit:
        from dreamidv_core.weights.checkpoints import load_dit
        ours = load_dit(args.weights_dit, weight_dtype="fp32", device=dev)
        cfg, what = ours.cfg, Path(args.weights_dit).name
        f, h, w = 3, 16, 16
    else:
        cfg, what = tiny_config("full", cross_attn_pose=True, pose_widths=(128, 256, 512, 512)), "tiny random"
        ours = init_random_(DreamIDVTransformer(cfg), seed=1).to(dev)
        f, h, w = 5, 8, 12
    ref = M.WanModel(model_type="i2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, in_dim=cfg.in_dim,
                     num_heads=cfg.num_heads, num_layers=cfg.num_layers, text_len=cfg.text_len,
                     text_dim=cfg.text_dim, cross_attn_norm=True, eps=cfg.eps)
    if cfg.dim != 1536:
        ref.project_pose = P.Projector(cin=3, vid_dim=cfg.dim)
    if args.weights_dit:
        res = ref.load_state_dict(torch.load(args.weights_dit, map_location="cpu", weights_only=True), strict=False)
        print(f"official DiT: {len(res.missing_keys)} missing, {len(res.unexpected_keys)} unexpected keys")
    else:
        ref.load_state_dict(ours.state_dict(), strict=True)
    ref = ref.to(dev).eval()
    ours.eval()
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev)
    x, y, img = rnd(16, f, h, w), rnd(cfg.in_dim - 16, f, h, w), rnd(16, 1, h, w)
    pose = torch.rand(1, 3, (f - 1) * 4 + 1, h * 8, w * 8, generator=g).to(dev)
    ctx, t = rnd(7, cfg.text_dim), torch.tensor([937], device=dev)
    seq_len = f * h * w // 4
    refs = torch.stack([img, torch.zeros_like(img)])

    def official_fwd(im, dtype=torch.float32):
        return ref([x], t=t, context=[ctx], seq_len=seq_len, pose_embedding=pose.to(dtype),
                   img_ref=[im.to(dtype)], y=[y.to(dtype)])[0]

    r_c, r_u = official_fwd(img), official_fwd(torch.zeros_like(img))
    out = ours(x[None].expand(2, -1, -1, -1, -1), t.float(), ours.prepare(ctx, y, refs, ours.pose_tokens(pose)))
    report("DiT", f"{what} fp32 cond (batched CFG row 0)", out[0], r_c, 1e-4)
    report("DiT", f"{what} fp32 zero-ref uncond (row 1)", out[1], r_u, 1e-4)
    cond = ours.prepare(ctx, y, refs, ours.pose_tokens(pose), cache_pose_kv=False)
    report("DiT", f"{what} fp32 cond, no pose-KV cache", ours(x[None], t.float(), cond, refs=[0])[0], r_c, 1e-4)

    amp = official("modules._amp")
    amp.DEVICE_TYPE = dev.type
    with amp.autocast(dtype=torch.bfloat16):
        r_b = official_fwd(img, torch.bfloat16)
    ours.compute_dtype = torch.bfloat16
    out_b = ours(x[None], t.float(), ours.prepare(ctx, y, img[None], ours.pose_tokens(pose)))[0]
    ours.compute_dtype = torch.float32
    report("DiT", f"{what} official bf16 autocast vs its fp32 (info)", r_b, r_c, 1.0)
    report("DiT", f"{what} ours bf16 compute, fp32 storage vs official bf16 autocast{exact(out_b, r_b)}",
           out_b, r_b, 5e-2)
    report("DiT", f"{what} ours bf16 vs official fp32", out_b, r_c, 5e-2)
    # the loader's default: weights STORED in bf16 (load_dit weight_dtype="bf16") vs the official's fp32 weights
    # under bf16 autocast; one call per guidance pass, as the sampler makes them by default (batch_guidance off:
    # a batch of two rounds differently in bf16, on both sides)
    with amp.autocast(dtype=torch.bfloat16):
        r_bu = official_fwd(torch.zeros_like(img), torch.bfloat16)
    stored = bf16_stored_copy(ours, dev)
    tokens = stored.pose_tokens(pose)
    for row, im, r in (("cond", img, r_b), ("zero-ref uncond", torch.zeros_like(img), r_bu)):
        out_s = stored(x[None], t.float(), stored.prepare(ctx, y, im[None], tokens))[0]
        report("DiT", f"{what} ours bf16 STORAGE {row} vs official bf16 autocast{exact(out_s, r)}", out_s, r, 0.0)


def exact(a, b) -> str:
    return " (bit-identical)" if torch.equal(a.float(), b.float()) else " (not bit-identical)"


def bf16_stored_copy(model, dev):
    """``model`` written to a checkpoint and read back by ``load_dit`` with its default bf16 storage."""
    from dreamidv_core.weights.checkpoints import load_dit, save_dit

    with tempfile.TemporaryDirectory() as tmp:
        save_dit(model, Path(tmp) / "dit.safetensors")
        return load_dit(Path(tmp) / "dit.safetensors", device=dev)  # weight_dtype "bf16", compute bf16


# --------------------------------------------------------------------------------------------- UniPC
def check_unipc(args, dev):
    from dreamidv_core.sampling.samplers import flow_sigmas, sample_unipc, sigma_to_timestep
    S = official("utils.fm_solvers_unipc").FlowUniPCMultistepScheduler
    for steps in (12, 20, 50):
        g = torch.Generator().manual_seed(steps)
        noise = torch.randn(1, 16, 3, 8, 10, generator=g)
        outs = [torch.randn(1, 16, 3, 8, 10, generator=g) for _ in range(steps)]
        velocity = lambda x, k: outs[k] + 0.3 * torch.tanh(x)  # depends on the state, so the path matters
        sch = S(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        sch.set_timesteps(steps, device="cpu", shift=5.0)
        ref = noise.clone()
        for k, t in enumerate(sch.timesteps):
            ref = sch.step(velocity(ref, k), t, ref, return_dict=False)[0]
        seen = []

        def model(x, sigma):
            seen.append(sigma)
            return velocity(x, len(seen) - 1)
        sigmas = flow_sigmas(steps, 5.0)
        ours = sample_unipc(model, noise.clone(), sigmas)
        exact = "bit-identical" if torch.equal(ours, ref) else "not bit-identical"
        report("UniPC", f"{steps} steps shift 5: final sample ({exact})", ours, ref, 1e-5)
        report("UniPC", f"{steps} steps: model timesteps", sigma_to_timestep(torch.stack(seen)), sch.timesteps, 0.0)
        report("UniPC", f"{steps} steps: sigmas (float32)", sigmas.float(), sch.sigmas, 0.0)


# ----------------------------------------------------------------------------------------------- VAE
@torch.no_grad()
def check_vae(args, dev):
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WAN21_VAE_CONFIG, WanVAE, load_wan_vae
    V = official("modules.vae")
    official("modules._amp").DEVICE_TYPE = dev.type
    cfg = WAN21_VAE_CONFIG if args.weights_vae else TINY_VAE_CONFIG
    with torch.device("meta" if args.weights_vae else "cpu"):
        raw = V.WanVAE_(dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                        attn_scales=[], temperal_downsample=list(cfg.temporal_downsample))
    if args.weights_vae:
        raw.load_state_dict(torch.load(args.weights_vae, map_location="cpu", weights_only=True), assign=True)
        ours, what, size = load_wan_vae(args.weights_vae, device=dev), Path(args.weights_vae).name, (64, 96)
    else:
        torch.manual_seed(0)
        for p in raw.parameters():
            torch.nn.init.normal_(p, std=0.2)
        ours, what, size = WanVAE(cfg), "tiny random", (32, 48)
        ours.load_state_dict(raw.state_dict(), strict=True)
        ours = ours.to(dev)
    # the official wrapper (its latent mean/std, autocast and clamp) around the prepared network
    V._video_vae = lambda pretrained_path=None, z_dim=None, **kw: raw
    off = V.WanVAE(z_dim=cfg.z_dim, vae_pth=None, dtype=torch.float32, device=dev)
    takes_device = "device" in inspect.signature(off.encode).parameters
    ours.eval()
    g = torch.Generator().manual_seed(0)
    for frames in (1, 5, 17):
        v = (torch.rand(3, frames, *size, generator=g) * 2 - 1).to(dev)
        ref = off.encode([v], dev)[0] if takes_device else off.encode([v])[0]
        report("VAE", f"{what} fp32 encode {frames} frames", ours.encode(v[None])[0], ref, 1e-4)
        report("VAE", f"{what} fp32 encode_oneshot {frames} frames", ours.encode_oneshot(v[None])[0], ref, 1e-4)
    for t in (1, 2, 5):
        z = torch.randn(16, t, size[0] // 8, size[1] // 8, generator=g).to(dev)
        ref = off.decode([z])[0]
        report("VAE", f"{what} fp32 decode {t} latent frames", ours.decode(z[None])[0], ref, 1e-4)
        report("VAE", f"{what} fp32 decode_oneshot {t} latent frames", ours.decode_oneshot(z[None])[0], ref, 1e-4)


# ------------------------------------------------------------------------------------------------ T5
@torch.no_grad()
def check_t5(args, dev):
    from dreamidv_core.models.umt5 import LAYOUT_OFFICIAL, UMT5Config, UMT5Encoder, export_state_dict, load_umt5_encoder
    T = official("modules.t5")
    cfg = UMT5Config(vocab_size=512, d_model=256, num_layers=4, num_heads=8, d_kv=32, d_ff=640)
    g = torch.Generator().manual_seed(0)
    model = UMT5Encoder(cfg)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else
                noise if ("rel_bias" in name or "token_embedding" in name) else noise / p.shape[1] ** 0.5)
    n, padded = 200, 512  # the official T5EncoderModel pads to text_len 512
    ids = torch.randint(3, cfg.vocab_size, (1, n), generator=g)
    ids_pad = torch.cat([ids, torch.zeros(1, padded - n, dtype=torch.long)], 1)
    mask = (torch.arange(padded) < n).long()[None]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, rel in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            sd = {k: v.to(dtype) for k, v in export_state_dict(model, LAYOUT_OFFICIAL).items()}
            path = Path(tmp) / f"t5_{str(dtype)[6:]}.pth"
            torch.save(sd, path)
            ref = T.T5Encoder(cfg.vocab_size, cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_heads, cfg.num_layers,
                              cfg.num_buckets, shared_pos=False, dropout=0.0).eval()
            ref.load_state_dict(sd)
            ref = ref.to(dev, dtype)
            r = ref(ids_pad.to(dev), mask.to(dev))[0, :n]
            ours = load_umt5_encoder(path, dtype=dtype, device=dev)
            report("T5", f"umT5 d_model 256 {str(dtype)[6:]}: ours unpadded vs official padded+mask",
                   ours(ids.to(dev))[0], r, rel)


CHECKS = {"dit": check_dit, "unipc": check_unipc, "vae": check_vae, "t5": check_t5}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout of bytedance/DreamID-V")
    ap.add_argument("--only", default=",".join(CHECKS), help="comma list of: " + ",".join(CHECKS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights-dit", help="run the DiT check with this dreamidv.pth (small input size)")
    ap.add_argument("--weights-vae", help="run the VAE check with this Wan2.1_VAE.pth (small input size)")
    args = ap.parse_args()
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(only) - set(CHECKS)
    if unknown:
        ap.error(f"unknown check(s) {sorted(unknown)}; choose from {list(CHECKS)}")
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix="dreamidv_official_") as tmp:
        stage_official(args.official.resolve(), Path(tmp))
        for name in only:
            CHECKS[name](args, dev)
    head = ("component", "setting", "max abs diff", "scale", "tolerance", "result")
    lines = [(c, s, f"{d:.3g}", f"{sc:.3g}", f"{r:g}*max(1,scale)" if r else "exact", "PASS" if ok else "FAIL")
             for c, s, d, sc, r, ok in ROWS]
    widths = [max(len(str(row[i])) for row in [head] + lines) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    print(f"\nparity vs {args.official} on {dev}\n" + fmt.format(*head) + "\n" + fmt.format(*("-" * w for w in widths)))
    for line in lines:
        print(fmt.format(*line))
    failed = sum(not row[-1] for row in ROWS)
    print(f"\n{len(ROWS) - failed}/{len(ROWS)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
