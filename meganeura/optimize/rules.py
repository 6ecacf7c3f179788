"""The rewrite rules: each one says which shape of graph becomes which, and why, in one line.

Terms are the egglog datatype below. Leaves carry their shape and dtype as strings (`Param` weights,
`Input` values), and the encoder records every original tensor's shape (`Shp`), rank and last
dimension as facts, so a rule that needs equal shapes or dtypes says so in its pattern and can never
make an ill-shaped graph. Rules are directional and there are no commutativity rules: the e-graph
stays small enough to saturate in milliseconds.

Rulesets run in order, each to saturation, and the sequence repeats until nothing changes:
  cleanup  view and scalar algebra
  fusion   producers into their consumers' prologues and epilogues (one kernel instead of two)
  layout   horizontal fusion: projections that read the same input become one packed weight, with a
           consumer (a gated linear, an attention) that reads the packed result directly
"""
from __future__ import annotations

from dataclasses import dataclass

# Lin   x w norm_w bias residual norm act softcap eps     one GEMM: norm prologue, bias/gate/softcap/residual
# Attn  q k v q_at k_at v_at norms q_norm_w k_norm_w eps pos rope attrs      attention reading packed heads
# AddNorm h y norm_w scale eps                             (h + rms_norm(y)) * scale, one row pass
# CWrite cache x pos at norm_w norm eps rope               heads at column `at` of x, normed, rotated, into the cache
# Absent optional operands are (Nil); absent options are "" / 0.0 / -1.
DATATYPE = """\
(datatype T
  (Nil)
  (Input String String String)
  (Param String String String)
  (State String String)
  (Stacked String String String)
  (Pack2 T T)
  (Pack3 T T T)
  (Embedding T T f64)
  (MatMul T T)
  (MatMulT T T)
  (Moe T T T T String i64)
  (Add T T)
  (Mul T T)
  (Scale T f64)
  (Silu T)
  (Sigmoid T)
  (Gelu T)
  (Softcap T f64)
  (Rope T T i64)
  (RmsNorm T T f64)
  (RmsNormU T f64)
  (Softmax T)
  (TopK T i64 i64)
  (Attention T T T String)
  (CachedAttention T T T T String)
  (CWrite T T T i64 T String f64 i64)
  (Reshape T String)
  (Slice T i64 i64 i64)
  (LastRow T)
  (Argmax T)
  (Glu String T T)
  (Lin T T T T T String String f64 f64)
  (Attn T T T i64 i64 i64 i64 T T f64 T i64 String)
  (AddNorm T T T T f64))
(relation Id (T i64))
(relation Shp (T String))
(relation Rank (T i64))
(relation Last (T i64))
(relation Same (T T))
"""

RULESETS = ("cleanup", "fusion", "layout")


@dataclass(frozen=True)
class Rule:
    name: str
    ruleset: str
    lhs: str | tuple[str, ...]        # a term matched as `e`, or facts (the first binds `e`)
    rhs: str | tuple[str, ...]        # the term `e` equals, or actions
    why: str

    def egglog(self) -> str:
        facts = (f"(= e {self.lhs})",) if isinstance(self.lhs, str) else self.lhs
        actions = (f"(union e {self.rhs})",) if isinstance(self.rhs, str) else self.rhs
        return f'(rule ({" ".join(facts)})\n      ({" ".join(actions)})\n      :ruleset {self.ruleset} :name "{self.name}")'


def _lin(x, w, nw="(Nil)", b="(Nil)", r="(Nil)", norm='""', act='""', cap="0.0", eps="0.0"):
    return f"(Lin {x} {w} {nw} {b} {r} {norm} {act} {cap} {eps})"


def _attn(q, k, v, at="0 0 0", norms="0", qw="(Nil)", kw="(Nil)", eps="0.0", pos="(Nil)", rope="-1", a="a"):
    return f"(Attn {q} {k} {v} {at} {norms} {qw} {kw} {eps} {pos} {rope} {a})"


def _cw(c, x, at="0", nw="(Nil)", norm='""', eps="0.0", rope="-1", p="p"):
    return f"(CWrite {c} {x} {p} {at} {nw} {norm} {eps} {rope})"


def _proj(x, w, b="(Nil)"):
    """A projection of the (possibly normed) input: the shape the packing rules look for."""
    return _lin(x, w, "nw", b, "(Nil)", "nm", '""', "0.0", "eps")


def _packed_writes(packed: str, k_at: str, v_at: str) -> tuple[str, ...]:
    """The actions of a cached packing rule: cache writes kc and vc remade to read k and v at columns k_at
    and v_at of the packed rows, the attention over them, and `Same` facts saying the new writes are kc
    and vc (a KV-sharing layer reading the cache takes the write the packed attention already makes)."""
    return (f"(let kc2 {_cw('ck', packed, k_at, 'kw', 'km', 'ke', 'kt')})",
            f"(let vc2 {_cw('cv', packed, v_at, 'vw', 'vm', 've', 'vt')})",
            f"(union e {_attn(packed, 'kc2', 'vc2', norms='n', qw='qw', kw='(Nil)', eps='ae', pos='p', rope='t')})",
            "(Same kc kc2)", "(Same vc vc2)")


RULES: tuple[Rule, ...] = (
    # -- cleanup
    Rule("reshape-reshape", "cleanup", "(Reshape (Reshape x s1) s2)", "(Reshape x s2)",
         "two views in a row are one view"),
    Rule("scale-scale", "cleanup", "(Scale (Scale x a) b)", "(Scale x (* a b))",
         "constant factors fold: one pass over the tensor instead of two"),
    Rule("scale-into-gather", "cleanup", "(Scale (Embedding t ids a) b)", "(Embedding t ids (* a b))",
         "an embedding's constant factor (Gemma's sqrt(hidden)) multiplies the rows as they are gathered"),
    Rule("sigmoid-silu", "cleanup", "(Mul x (Sigmoid x))", "(Silu x)",
         "x·σ(x) is SiLU: one kernel, one read of x"),
    Rule("sigmoid-silu-left", "cleanup", "(Mul (Sigmoid x) x)", "(Silu x)",
         "σ(x)·x is SiLU too"),
    # -- fusion: pointwise
    Rule("swiglu", "fusion", ("(= e (Mul (Silu g) u))", "(Shp g s)", "(Shp u s)"), '(Glu "silu" g u)',
         "silu(g)·u in one pass (equal shapes only: a broadcast is not a GLU)"),
    Rule("geglu", "fusion", ("(= e (Mul (Gelu g) u))", "(Shp g s)", "(Shp u s)"), '(Glu "gelu_tanh" g u)',
         "gelu(g)·u in one pass (equal shapes only)"),
    # -- fusion: the linear layer's prologue and epilogues
    Rule("linear", "fusion", "(MatMulT x w)", _lin("x", "w"),
         "an [out, in] matmul is a linear with an empty prologue and epilogue"),
    Rule("norm-prologue", "fusion", _lin("(RmsNorm x nw eps)", "w", "(Nil)", "b", "r", '""', "act", "cap"),
         _lin("x", "w", "nw", "b", "r", '"weighted"', "act", "cap", "eps"),
         "RMS-normalise the rows while loading them: the normed tensor is never written"),
    Rule("unit-norm-prologue", "fusion", _lin("(RmsNormU x eps)", "w", "(Nil)", "b", "r", '""', "act", "cap"),
         _lin("x", "w", "(Nil)", "b", "r", '"unit"', "act", "cap", "eps"),
         "the same for a norm without a gain"),
    Rule("bias-epilogue", "fusion",
         (f"(= e (Add {_lin('x', 'w', 'nw', '(Nil)', '(Nil)', 'nm', chr(34) * 2, '0.0', 'eps')} b))",
          "(Rank b 1)", "(Last b n)", "(Last e n)"),
         _lin("x", "w", "nw", "b", "(Nil)", "nm", '""', "0.0", "eps"),
         "a per-column bias is added as each output is stored (1-D, one entry per column only)"),
    Rule("residual-epilogue", "fusion",
         (f"(= e (Add r {_lin('x', 'w', 'nw', 'b', '(Nil)', 'nm', 'act', 'cap', 'eps')}))", "(Shp e s)", "(Shp r s)"),
         _lin("x", "w", "nw", "b", "r", "nm", "act", "cap", "eps"),
         "the residual stream is added as the output is stored (same shape only)"),
    Rule("residual-epilogue-left", "fusion",
         (f"(= e (Add {_lin('x', 'w', 'nw', 'b', '(Nil)', 'nm', 'act', 'cap', 'eps')} r))", "(Shp e s)", "(Shp r s)"),
         _lin("x", "w", "nw", "b", "r", "nm", "act", "cap", "eps"),
         "the same with the operands the other way round"),
    Rule("softcap-epilogue", "fusion",
         f"(Softcap {_lin('x', 'w', 'nw', 'b', '(Nil)', 'nm', 'act', '0.0', 'eps')} c)",
         _lin("x", "w", "nw", "b", "(Nil)", "nm", "act", "c", "eps"),
         "logit soft-capping happens in the LM head's epilogue: the raw logits are never written"),
    Rule("post-norm-residual", "fusion", ("(= e (Add h (RmsNorm y w eps)))", "(Shp h s)", "(Shp y s)"),
         "(AddNorm h y w (Nil) eps)", "a post-norm and its residual add are one row pass"),
    Rule("post-unit-norm-residual", "fusion", ("(= e (Add h (RmsNormU y eps)))", "(Shp h s)", "(Shp y s)"),
         "(AddNorm h y (Nil) (Nil) eps)", "the same for a norm without a gain"),
    Rule("layer-scalar", "fusion", ("(= e (Mul (AddNorm h y w (Nil) eps) c))", '(Shp c "1")'),
         "(AddNorm h y w c eps)", "a per-layer scalar multiplies in the same row pass"),
    # -- fusion: attention loads its operands through norms and RoPE
    Rule("attention", "fusion", "(Attention q k v a)", _attn("q", "k", "v"),
         "attention that can read its heads from any row layout"),
    Rule("rope-into-attention", "fusion", _attn("(Rope q p t)", "(Rope k p t)", "v"),
         _attn("q", "k", "v", pos="p", rope="t"),
         "rotate q and k as they are loaded: the rotated tensors are never written"),
    Rule("qk-norm-into-attention", "fusion",
         _attn("(RmsNorm q qw eps)", "(RmsNorm k kw eps)", "v", pos="p", rope="t"),
         _attn("q", "k", "v", norms="3", qw="qw", kw="kw", eps="eps", pos="p", rope="t"),
         "per-head q/k norms (Qwen3, Gemma) are applied on load, before the rotation"),
    Rule("v-norm-into-attention", "fusion",
         _attn("q", "k", "(RmsNormU v eps)", norms="3", qw="qw", kw="kw", eps="eps", pos="p", rope="t"),
         _attn("q", "k", "v", norms="7", qw="qw", kw="kw", eps="eps", pos="p", rope="t"),
         "Gemma's gainless v norm is applied on load too"),
    # -- fusion: a KV cache is written through the key's norm and RoPE; attention over it rotates q only
    Rule("cached-attention", "fusion", "(CachedAttention q k v p a)", _attn("q", "k", "v", pos="p"),
         "attention over a cache reads its query heads from any row layout too"),
    Rule("rope-into-cache-write", "fusion", _cw("c", "(Rope x p t)"), _cw("c", "x", rope="t"),
         "keys are rotated on their way into the cache: the rotated tensor is never written elsewhere"),
    Rule("norm-into-cache-write", "fusion", _cw("c", "(RmsNorm x w eps)", rope="t"),
         _cw("c", "x", nw="w", norm='"weighted"', eps="eps", rope="t"),
         "per-head k norms are applied on the way into the cache, before the rotation"),
    Rule("unit-norm-into-cache-write", "fusion", _cw("c", "(RmsNormU x eps)", rope="t"),
         _cw("c", "x", norm='"unit"', eps="eps", rope="t"), "Gemma's gainless v norm too"),
    Rule("rope-q-into-cached-attention", "fusion", _attn("(Rope q p t)", "k", "v", pos="p"),
         _attn("q", "k", "v", pos="p", rope="t"),
         "over a cache only q is rotated on load (pos is set and no table yet: the keys were rotated when written)"),
    Rule("q-norm-into-attention", "fusion", _attn("(RmsNorm q qw eps)", "k", "v", pos="p", rope="t"),
         _attn("q", "k", "v", norms="1", qw="qw", eps="eps", pos="p", rope="t"),
         "q's per-head norm on load when k's is not there to take (its keys come from a cache)"),
    # -- layout: horizontal fusion with a packed consumer
    Rule("gate-up-pack", "layout",
         (f"(= e (Glu act {_proj('x', '(Param kg s d)')} {_proj('x', '(Param ku s d)')}))",),
         _lin("x", "(Pack2 (Param kg s d) (Param ku s d))", "nw", "(Nil)", "(Nil)", "nm", "act", "0.0", "eps"),
         "gate and up read the same input: one GEMM over [gate; up] rows with the GLU in its epilogue "
         "(equal shapes and dtypes only)"),
    Rule("gate-up-pack-bias", "layout",
         (f"(= e (Glu act {_proj('x', '(Param kg s d)', '(Param bg sb db)')} "
          f"{_proj('x', '(Param ku s d)', '(Param bu sb db)')}))",),
         _lin("x", "(Pack2 (Param kg s d) (Param ku s d))", "nw", "(Pack2 (Param bg sb db) (Param bu sb db))",
              "(Nil)", "nm", "act", "0.0", "eps"),
         "the same with biases, packed alike"),
    Rule("qkv-pack", "layout",
         (f"(= e {_attn('(Reshape lq rq)', '(Reshape lk rk)', '(Reshape lv rv)', norms='n', qw='qw', kw='kw', eps='ae', pos='p', rope='t')})",
          f"(= lq {_proj('x', '(Param kq sq d)')})", f"(= lk {_proj('x', '(Param kk sk d)')})",
          f"(= lv {_proj('x', '(Param kv sk d)')})", "(Last lq nq)", "(Last lk nk)"),
         (f"(let qkv {_proj('x', '(Pack3 (Param kq sq d) (Param kk sk d) (Param kv sk d))')})",
          f"(union e {_attn('qkv', 'qkv', 'qkv', at='0 nq (+ nq nk)', norms='n', qw='qw', kw='kw', eps='ae', pos='p', rope='t')})"),
         "q, k and v read the same input: one GEMM over [q; k; v] rows, and attention reads its heads "
         "from the packed rows (equal dtypes only)"),
    Rule("qkv-pack-bias", "layout",
         (f"(= e {_attn('(Reshape lq rq)', '(Reshape lk rk)', '(Reshape lv rv)', norms='n', qw='qw', kw='kw', eps='ae', pos='p', rope='t')})",
          f"(= lq {_proj('x', '(Param kq sq d)', '(Param bq bsq bd)')})",
          f"(= lk {_proj('x', '(Param kk sk d)', '(Param bk bsk bd)')})",
          f"(= lv {_proj('x', '(Param kv sk d)', '(Param bv bsk bd)')})", "(Last lq nq)", "(Last lk nk)"),
         (f"(let qkv {_proj('x', '(Pack3 (Param kq sq d) (Param kk sk d) (Param kv sk d))', '(Pack3 (Param bq bsq bd) (Param bk bsk bd) (Param bv bsk bd))')})",
          f"(union e {_attn('qkv', 'qkv', 'qkv', at='0 nq (+ nq nk)', norms='n', qw='qw', kw='kw', eps='ae', pos='p', rope='t')})"),
         "the same with q/k/v biases (Qwen2), packed alike"),
    Rule("qk-pack-shared-kv", "layout",
         (f"(= e {_attn('(Reshape lq rq)', '(Reshape lk rk)', '(Reshape lk rk)', norms='n', qw='qw', kw='kw', eps='ae', pos='p', rope='t')})",
          f"(= lq {_proj('x', '(Param kq sq d)')})", f"(= lk {_proj('x', '(Param kk sk d)')})", "(Last lq nq)"),
         (f"(let qk {_proj('x', '(Pack2 (Param kq sq d) (Param kk sk d))')})",
          f"(union e {_attn('qk', 'qk', 'qk', at='0 nq nq', norms='n', qw='qw', kw='kw', eps='ae', pos='p', rope='t')})"),
         "when v is k (Gemma's K=V layers), pack q and k only and read v from the k columns"),
    # With a cache, k and v reach attention through their cache writes: the packed GEMM gets new writes
    # that read k and v at their column offsets, and a new attention reads q from it (new classes, not
    # unions, so that the extractor weighs the packed triple as one choice; `Same` records that each new
    # write is an old one, for a later layer that reads the cache, see `_packed_writes`).
    Rule("qkv-pack-cached", "layout",
         (f"(= e {_attn('(Reshape lq rq)', 'kc', 'vc', norms='n', qw='qw', kw='(Nil)', eps='ae', pos='p', rope='t')})",
          f"(= kc {_cw('ck', '(Reshape lk rk)', nw='kw', norm='km', eps='ke', rope='kt')})",
          f"(= vc {_cw('cv', '(Reshape lv rv)', nw='vw', norm='vm', eps='ve', rope='vt')})",
          f"(= lq {_proj('x', '(Param kq sq d)')})", f"(= lk {_proj('x', '(Param kk sk d)')})",
          f"(= lv {_proj('x', '(Param kv sk d)')})", "(Last lq nq)", "(Last lk nk)"),
         (f"(let qkv {_proj('x', '(Pack3 (Param kq sq d) (Param kk sk d) (Param kv sk d))')})",
          *_packed_writes('qkv', 'nq', '(+ nq nk)')),
         "q, k and v read the same input: one GEMM over [q; k; v] rows; k and v go into their caches and "
         "q into attention from column offsets of the packed rows (equal dtypes only)"),
    Rule("qkv-pack-bias-cached", "layout",
         (f"(= e {_attn('(Reshape lq rq)', 'kc', 'vc', norms='n', qw='qw', kw='(Nil)', eps='ae', pos='p', rope='t')})",
          f"(= kc {_cw('ck', '(Reshape lk rk)', nw='kw', norm='km', eps='ke', rope='kt')})",
          f"(= vc {_cw('cv', '(Reshape lv rv)', nw='vw', norm='vm', eps='ve', rope='vt')})",
          f"(= lq {_proj('x', '(Param kq sq d)', '(Param bq bsq bd)')})",
          f"(= lk {_proj('x', '(Param kk sk d)', '(Param bk bsk bd)')})",
          f"(= lv {_proj('x', '(Param kv sk d)', '(Param bv bsk bd)')})", "(Last lq nq)", "(Last lk nk)"),
         (f"(let qkv {_proj('x', '(Pack3 (Param kq sq d) (Param kk sk d) (Param kv sk d))', '(Pack3 (Param bq bsq bd) (Param bk bsk bd) (Param bv bsk bd))')})",
          *_packed_writes('qkv', 'nq', '(+ nq nk)')),
         "the same with q/k/v biases (Qwen2), packed alike"),
    Rule("qk-pack-shared-kv-cached", "layout",
         (f"(= e {_attn('(Reshape lq rq)', 'kc', 'vc', norms='n', qw='qw', kw='(Nil)', eps='ae', pos='p', rope='t')})",
          f"(= kc {_cw('ck', '(Reshape lk rk)', nw='kw', norm='km', eps='ke', rope='kt')})",
          f"(= vc {_cw('cv', '(Reshape lk rk)', nw='vw', norm='vm', eps='ve', rope='vt')})",
          f"(= lq {_proj('x', '(Param kq sq d)')})", f"(= lk {_proj('x', '(Param kk sk d)')})", "(Last lq nq)"),
         (f"(let qk {_proj('x', '(Pack2 (Param kq sq d) (Param kk sk d))')})", *_packed_writes('qk', 'nq', 'nq')),
         "when v is k (Gemma's K=V layers), pack q and k only; both caches are written from the k columns"),
)

SCHEDULE = "(run-schedule (saturate (seq " + " ".join(f"(saturate (run {r}))" for r in RULESETS) + ")))"


def program_text() -> str:
    """The datatype, the rulesets and every rule, as one egglog program prefix."""
    parts = [DATATYPE] + [f"(ruleset {r})" for r in RULESETS]
    for rule in RULES:
        parts.append(f";; {rule.name}: {rule.why}\n{rule.egglog()}")
    return "\n".join(parts) + "\n"
