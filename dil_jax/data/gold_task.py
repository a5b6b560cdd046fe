"""The built-in gold-reward task: a tiny synthetic language with a known, two-mode reward.

Why this exists. Alignment methods can only be compared honestly when the true reward is known:
real preference data has no ground truth, and a learned "gold" reward model is itself a
confounder. This module is the library's default, download-free task. It defines prompts, a gold
reward with two distinct high-reward modes, a noisy base distribution to pretrain the reference
policy on, Bradley–Terry preference pairs and expert demonstrations, all in pure numpy and all
deterministic by seed. It is sized so that a 2-layer, width-64 transformer on a 32-token
vocabulary and 20-token sequences learns the base distribution on a CPU in well under a minute.

The language. Token ids: ``PAD = 0``, ``BOS = 1``, ``EOS = 2``, ``STYLE = 3`` (the style marker,
see below); content tokens are ``CONTENT_OFFSET = 4 .. vocab_size - 1``, an alphabet of
``K = vocab_size - 4`` symbols (28 by default). A prompt is ``BOS`` followed by
``L = prompt_len - 1`` content tokens drawn uniformly (7 by default). A response is at most
``max_response_len`` tokens including its ``EOS``, then ``PAD``.

The two modes, and why these rules.
- Mode A, *copy*: the response repeats the prompt's content, ``y_j = x_j``.
- Mode B, *translate*: the response repeats the prompt through a fixed substitution, rotation by
  half the alphabet, ``y_j = (x_j + K // 2) mod K`` (in content-index space).
Both rules read the prompt at a constant relative offset, the easiest long-range pattern for a
small attention model (one head with relative positions does it), so a 2-layer model learns them
in a few hundred steps; reversal or sorting would need absolute-position arithmetic and would make
the task about capacity rather than alignment. The modes are nevertheless genuinely distinct: the
rotation has no fixed point, so the two rules disagree at *every* position, a response cannot
score well on both, and the very first response token already commits to a mode. Two equally
good modes are what the mode-coverage claim needs (docs/objectives.md §4 C2: SFT spreads over both,
reverse-KL methods concentrate).

The gold reward, in [0, 1]. Each mode's target is its ``L`` tokens followed by ``EOS``. The
response is read up to and including its first ``EOS`` (the whole row if there is none), with
every ``STYLE`` token removed; call that ``s``. Then

    score_m = #{k < min(|s|, L+1) : s_k = target_m[k]} / max(|s|, L+1),
    gold_reward = max(score_A, score_B).

Positional agreement gives graded partial credit (each wrong token costs 1/(L+1)); the
``max(|s|, L+1)`` denominator penalises answers that are too long, and because ``EOS`` is part of
the target a missing or early ``EOS`` costs like a wrong token. Only a response that follows one
rule closely reaches ~1. The function is total: any ids a policy can emit (``PAD`` or ``BOS``
mid-response, no ``EOS``, out-of-alphabet specials) are simply tokens that do not match.
``mode_of`` labels a response 1 (A) or 2 (B) when that mode's score is the larger (ties go to A)
and exceeds ``mode_threshold``, else 0. The rules never agree on a content token, so the scores
are nearly complementary (``score_A + score_B <= 1 + 1/(L+1)``, the shared ``EOS`` counted by
both): a response above the default threshold of 0.5 clearly belongs to one mode.

The base distribution (``source='base'``), the reference policy's pretraining data, is a mixture:
``base_share_a`` and ``base_share_b`` of responses attempt mode A or B, the rest are weak
(uniformly random content of random length 1..R-1). An attempt follows its rule for ``k`` tokens,
then derails: one wrong token, random babble of random length, ``EOS``. ``k`` is geometric with
per-token hazard ``base_derail_rate``, capped at ``L`` (a complete answer, which then stops). Why
derailing rather than uniform per-token noise: the corruption level still varies from response
to response, so rewards are graded (``k / max(len, L+1)``) and Bradley–Terry pairs carry
information about *degree* of quality, not just mode versus junk; but every token before the
derail point is a clean example of the rule, which is what lets a 2-layer, width-64 model learn
the rules from base data in a couple of hundred steps. (With uniform per-token noise at the same
mean reward the copy circuit took ~1000 steps to appear; a constant hazard is also the simplest
thing for an autoregressive model to represent.) With the defaults the base mean gold reward is
≈0.31, about 10% of responses are in each mode by ``mode_of``, and ~15% are complete answers: the
high-reward responses of both modes are well inside the base support, so aligning it is
reweighting, not discovery, the regime the KL-regularised objectives of docs/objectives.md assume.
Measured on CPU with a scratch 2-layer, width-64 RoPE transformer: 600 pretraining steps (batch
128, AdamW 3e-3; the loss plateaus after ~200) give a reference policy whose samples score ≈0.24,
and 300 DPO steps (β = 0.1, 64 pairs a step, Adam 1e-3) on base preference pairs raise that to
≈0.67 with both modes still present (≈43% each by ``mode_of``).

Experts. ``'expert_a'`` and ``'expert_b'`` follow one rule each, ``'expert'`` mixes them
(``expert_share_a`` of A). Demonstrations keep a small per-token corruption ``expert_noise``
(mean reward ≈0.97 rather than exactly 1) so that methods which go *beyond* the demonstrations
(§4 C5: reward extrapolation with best-of-N) have room to show it. ``'expert_styled'`` is the
same expert written by "a different model family": every response starts with the ``STYLE``
token. The gold reward ignores ``STYLE`` tokens wherever they appear, so the marker is quality-
irrelevant, yet it separates demonstrations from base-policy samples perfectly. A discriminator
trained on demonstrations versus the policy's own samples can therefore key on the style instead
of quality (the heterogeneity failure of §4 C4); a marker that crowds out the ``EOS`` within the
length budget does still cost reward, as an over-long answer should. ``'random'`` is the weak
component alone.

Preferences. ``preference_dataset`` draws two responses per prompt from a source and orders them
by one Bradley–Terry draw on the gold reward, ``P(y1 ≻ y2) = σ((r1 − r2) / bt_temperature)``,
i.e. labels are noisy exactly as the BT model says, not argmax-clean.

Determinism. Every draw comes from ``np.random.default_rng`` seeded by ``(seed, stream name)``,
with distinct names for prompts, responses per source, preference-pair responses and labels, so
equal seeds in different roles never alias (e.g. prompts and random responses of seed 0 are
independent).

Trainer format (``sft_dataset`` with ``N = 1``, ``preference_dataset`` with ``N = 2``, index 0
chosen, 1 rejected): ``input_ids [n, N, T]`` (prompt, response, ``PAD``; ``T = seq_len``),
``attention_mask [n, N, T]`` (1 on prompt and response tokens, ``EOS`` included),
``loss_mask [n, N, T]`` (1 on response tokens including ``EOS``, 0 on prompt and padding),
``example_id [n]``, ``prompt [n, P]`` and ``gold_reward [n, N]``, all int32 except the float32
reward.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

PAD, BOS, EOS = 0, 1, 2
STYLE = 3  # the reward-irrelevant style marker of the 'expert_styled' "model family"
CONTENT_OFFSET = 4  # first content token id; ids below are special

SOURCES = ("base", "expert", "expert_a", "expert_b", "expert_styled", "random")
# Preference sources whose chosen response is a demonstration and whose rejected response comes
# from another source: the AfD paper's "DPO with demonstrations as positives" baseline. There is
# no Bradley–Terry draw; the demonstration is always the chosen one.
DEMO_PAIR_SOURCES = {
    "expert_vs_base": ("expert", "base"),
    "expert_styled_vs_base": ("expert_styled", "base"),
    "expert_a_styled_vs_base": ("expert_a_styled", "base"),
}
# Further response sources, kept out of SOURCES so the original six keep their contracts:
# 'expert_a_styled' is the mode-A expert written by the styled "family" (every response starts
# with STYLE). The AfD reward-model experiments (C4–C7) use it: a single-mode expert keeps
# π_SFT's quality from being limited by mode mixing (a small policy fine-tuned on the two-mode
# expert interleaves the two rules within one response), so what is measured is the reward
# models, and heterogeneity is the only difference between demonstrations and π_SFT's family.
EXTRA_SOURCES = ("expert_a_styled",)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """A generator for one named stream of one seed; names keep roles from aliasing.

    crc32 rather than ``hash`` because Python salts string hashes per process.
    """
    return np.random.default_rng([int(seed), zlib.crc32(stream.encode())])


def _response_span(responses: np.ndarray) -> np.ndarray:
    """Which response positions count: up to and including the first EOS, all if none.

    Args:
      responses: [n, R] int token ids.

    Returns:
      [n, R] bool.
    """
    is_eos = responses == EOS  # [n, R]
    has_eos = is_eos.any(axis=1)  # [n]
    first_eos = np.where(has_eos, is_eos.argmax(axis=1), responses.shape[1])  # [n]
    return np.arange(responses.shape[1])[None, :] <= first_eos[:, None]  # [n, R]


def positional_score(responses: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Agreement of responses with target sequences, STYLE tokens ignored, in [0, 1].

    ``score = #{k < min(|s|, |t|) : s_k = t_k} / max(|s|, |t|)`` where ``s`` is the response up to
    and including its first EOS (whole row without one) with STYLE tokens removed, and ``t`` the
    target (which should end in EOS).

    Args:
      responses: [n, R] int token ids, any values.
      targets: [n, M] int target ids, all positions real.

    Returns:
      [n] float32 scores.
    """
    responses = np.asarray(responses)
    m = targets.shape[1]
    span = _response_span(responses)  # [n, R]
    keep = span & (responses != STYLE)  # [n, R]
    rank = np.cumsum(keep, axis=1) - 1  # [n, R] index of each kept token in s
    length = keep.sum(axis=1)  # [n] |s|
    in_target = keep & (rank < m)  # [n, R]
    target_at = np.take_along_axis(targets, np.clip(rank, 0, m - 1), axis=1)  # [n, R]
    matches = (in_target & (responses == target_at)).sum(axis=1)  # [n]
    return (matches / np.maximum(length, m)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class GoldTask:
    """A synthetic prompt/response task with a known two-mode gold reward (see module doc).

    Attributes:
      vocab_size: total vocabulary incl. the 4 specials; divisible by 8 so tensor-parallel tests
        can shard it.
      prompt_len: P, prompt length including BOS; the prompt has P - 1 content tokens.
      max_response_len: R, response budget including EOS; must fit a mode answer plus a style
        marker, R >= P + 1.
      base_share_a: share of base responses that attempt mode A.
      base_share_b: share of base responses that attempt mode B; the rest are random.
      base_derail_rate: per-token hazard with which a base mode attempt derails into junk.
      expert_noise: per-token corruption rate of expert demonstrations.
      expert_share_a: share of mode A in the mixed 'expert' and 'expert_styled' sources.
      bt_temperature: τ in P(y1 ≻ y2) = σ((r1 − r2) / τ); rewards live in [0, 1].
      mode_threshold: a mode's score must exceed this for ``mode_of`` to assign it.
    """

    vocab_size: int = 32
    prompt_len: int = 8
    max_response_len: int = 12
    base_share_a: float = 0.35
    base_share_b: float = 0.35
    base_derail_rate: float = 0.2
    expert_noise: float = 0.03
    expert_share_a: float = 0.5
    bt_temperature: float = 0.1
    mode_threshold: float = 0.5

    def __post_init__(self):
        if self.vocab_size < CONTENT_OFFSET + 2:
            raise ValueError(f"vocab_size must exceed {CONTENT_OFFSET + 1}, got {self.vocab_size}")
        if self.prompt_len < 2:
            raise ValueError(f"prompt_len must be >= 2 (BOS + content), got {self.prompt_len}")
        if self.max_response_len < self.prompt_len + 1:
            raise ValueError(
                f"max_response_len={self.max_response_len} cannot hold a styled mode answer "
                f"(needs prompt_len + 1 = {self.prompt_len + 1})"
            )
        if not (
            0 <= self.base_share_a
            and 0 <= self.base_share_b
            and self.base_share_a + self.base_share_b <= 1
        ):
            raise ValueError("base_share_a, base_share_b must be >= 0 and sum to <= 1")
        if not 0 < self.base_derail_rate <= 1:
            raise ValueError("base_derail_rate must lie in (0, 1]")
        for name in ("expert_noise", "expert_share_a"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.bt_temperature <= 0:
            raise ValueError("bt_temperature must be positive")

    # ----------------------------------------------------------------------------- geometry

    @property
    def seq_len(self) -> int:
        """T = P + R, the trainer's sequence length."""
        return self.prompt_len + self.max_response_len

    @property
    def num_content(self) -> int:
        """K, the size of the content alphabet."""
        return self.vocab_size - CONTENT_OFFSET

    @property
    def answer_len(self) -> int:
        """L, content tokens in a mode answer (= prompt content length)."""
        return self.prompt_len - 1

    @property
    def style_token(self) -> int:
        """The style marker that 'expert_styled' demonstrations start with."""
        return STYLE

    # ----------------------------------------------------------------------------- the rules

    def mode_targets(self, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exact mode A and mode B answers to each prompt, EOS included.

        Args:
          prompts: [n, P] int32, BOS then content.

        Returns:
          (target_a, target_b), each [n, L + 1] int32.
        """
        content = np.asarray(prompts)[:, 1:] - CONTENT_OFFSET  # [n, L] content indices
        k = self.num_content
        translated = (content + k // 2) % k  # [n, L] rotation by K/2: no fixed point
        eos = np.full((content.shape[0], 1), EOS)
        target_a = np.concatenate([content + CONTENT_OFFSET, eos], axis=1)
        target_b = np.concatenate([translated + CONTENT_OFFSET, eos], axis=1)
        return target_a.astype(np.int32), target_b.astype(np.int32)

    def mode_scores(self, prompts: np.ndarray, responses: np.ndarray) -> np.ndarray:
        """Per-mode agreement scores.

        Args:
          prompts: [n, P] int prompts.
          responses: [n, R'] int responses, any ids, any width.

        Returns:
          [n, 2] float32 (score_A, score_B), each in [0, 1].
        """
        target_a, target_b = self.mode_targets(prompts)
        responses = np.asarray(responses)
        return np.stack(
            [positional_score(responses, target_a), positional_score(responses, target_b)],
            axis=1,
        )

    def gold_reward(self, prompts: np.ndarray, responses: np.ndarray) -> np.ndarray:
        """The gold reward max(score_A, score_B) in [0, 1]; total over all token sequences.

        Args:
          prompts: [n, P] int prompts.
          responses: [n, R'] int responses (EOS then PAD when well formed; anything works).

        Returns:
          [n] float32.
        """
        return self.mode_scores(prompts, responses).max(axis=1)

    def mode_of(self, prompts: np.ndarray, responses: np.ndarray) -> np.ndarray:
        """Which mode a response follows: 0 neither, 1 mode A, 2 mode B.

        The larger score wins, and must exceed ``mode_threshold``.

        Returns:
          [n] int32.
        """
        scores = self.mode_scores(prompts, responses)  # [n, 2]
        best = scores.argmax(axis=1)  # [n] ties go to A
        return np.where(scores.max(axis=1) > self.mode_threshold, best + 1, 0).astype(np.int32)

    @staticmethod
    def has_style_marker(responses: np.ndarray) -> np.ndarray:
        """Whether each response starts with the style marker; [n] bool."""
        return np.asarray(responses)[:, 0] == STYLE

    # ----------------------------------------------------------------------------- sampling

    def sample_prompts(self, n: int, seed: int) -> np.ndarray:
        """[n, P] int32 prompts: BOS then P - 1 uniform content tokens, no padding."""
        rng = _rng(seed, "prompts")
        content = rng.integers(CONTENT_OFFSET, self.vocab_size, size=(n, self.answer_len))
        bos = np.full((n, 1), BOS)
        return np.concatenate([bos, content], axis=1).astype(np.int32)

    def sample_responses(self, prompts: np.ndarray, seed: int, source: str = "base") -> np.ndarray:
        """Responses to ``prompts`` from one of ``SOURCES`` (see module doc).

        Args:
          prompts: [n, P] int prompts.
          seed: the draw's seed; each source has its own stream.
          source: 'base', 'expert', 'expert_a', 'expert_b', 'expert_styled' or 'random'.

        Returns:
          [n, R] int32: content, EOS, then PAD.
        """
        return self._sample(np.asarray(prompts), _rng(seed, f"responses/{source}"), source)

    def _corrupt(self, tokens: np.ndarray, rate: np.ndarray, rng: np.random.Generator):
        """Replace each content token with prob ``rate`` [n] by a *different* content token."""
        n, length = tokens.shape
        k = self.num_content
        hit = rng.random((n, length)) < rate[:, None]  # [n, L]
        offset = rng.integers(1, k, size=(n, length))  # [n, L] never 0: always a change
        replaced = (tokens - CONTENT_OFFSET + offset) % k + CONTENT_OFFSET
        return np.where(hit, replaced, tokens)

    def _random_content(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Weak responses: uniform content of uniform length 1..R-1 ([n, R-1] tokens, [n])."""
        r = self.max_response_len
        tokens = rng.integers(CONTENT_OFFSET, self.vocab_size, size=(n, r - 1))
        lengths = rng.integers(1, r, size=n)
        return tokens, lengths

    def _assemble(self, content: np.ndarray, lengths: np.ndarray, styled: np.ndarray):
        """Lay out [STYLE] + content[:length] + EOS + PAD in R slots.

        Args:
          content: [n, C] content tokens, C <= R - 1 (R - 2 when styled).
          lengths: [n] how many of them to use.
          styled: [n] bool, prepend the style marker.

        Returns:
          [n, R] int32.
        """
        n = content.shape[0]
        r = self.max_response_len
        shift = styled.astype(np.int64)  # [n] 1 if the marker takes slot 0
        pos = np.arange(r)[None, :] - shift[:, None]  # [n, R] content index at each slot
        end = lengths[:, None]  # [n, 1]
        gathered = np.take_along_axis(content, np.clip(pos, 0, content.shape[1] - 1), axis=1)
        out = np.full((n, r), PAD, dtype=np.int64)
        out = np.where((pos >= 0) & (pos < end), gathered, out)
        out = np.where(pos == end, EOS, out)
        out = np.where(pos == -1, STYLE, out)
        return out.astype(np.int32)

    def _sample(self, prompts: np.ndarray, rng: np.random.Generator, source: str) -> np.ndarray:
        """Draw responses; every branch consumes the stream the same way per source."""
        if source not in SOURCES + EXTRA_SOURCES:
            raise ValueError(
                f"unknown source {source!r}; expected one of {SOURCES + EXTRA_SOURCES}"
            )
        n = prompts.shape[0]
        target_a, target_b = self.mode_targets(prompts)
        answer_a, answer_b = target_a[:, :-1], target_b[:, :-1]  # [n, L] without EOS
        no_style = np.zeros(n, dtype=bool)

        if source == "random":
            tokens, lengths = self._random_content(n, rng)
            return self._assemble(tokens, lengths, no_style)

        if source == "base":
            share = [self.base_share_a, self.base_share_b]
            component = rng.choice(3, size=n, p=share + [1.0 - sum(share)])  # 0 A, 1 B, 2 weak
            answer = np.where((component == 0)[:, None], answer_a, answer_b)  # [n, L]
            width = self.max_response_len - 1
            answer = np.pad(answer, ((0, 0), (0, width - self.answer_len)))  # [n, R-1]
            # k faithful tokens: a constant per-token hazard, capped at the full answer.
            kept = np.minimum(rng.geometric(self.base_derail_rate, size=n) - 1, self.answer_len)
            babble = rng.integers(1, self.max_response_len - kept)  # [n] junk length >= 1
            junk, _ = self._random_content(n, rng)  # [n, R-1]
            # The first junk token must differ from the answer, so exactly k tokens are right.
            derail = self._corrupt(answer, np.ones(n), rng)  # [n, R-1] all changed
            pos = np.arange(width)[None, :]  # [1, R-1]
            attempt = np.where(
                pos < kept[:, None], answer, np.where(pos == kept[:, None], derail, junk)
            )
            attempt_len = np.where(kept == self.answer_len, kept, kept + babble)
            weak, weak_len = self._random_content(n, rng)  # [n, R-1], [n]
            is_weak = component == 2
            content = np.where(is_weak[:, None], weak, attempt)
            lengths = np.where(is_weak, weak_len, attempt_len)
            return self._assemble(content, lengths, no_style)

        # expert sources
        if source in ("expert_a", "expert_a_styled"):
            use_a = np.ones(n, dtype=bool)
        elif source == "expert_b":
            use_a = np.zeros(n, dtype=bool)
        else:
            use_a = rng.random(n) < self.expert_share_a
        answer = np.where(use_a[:, None], answer_a, answer_b)  # [n, L]
        answer = self._corrupt(answer, np.full(n, self.expert_noise), rng)
        styled = np.full(n, source in ("expert_styled", "expert_a_styled"))
        return self._assemble(answer, np.full(n, self.answer_len), styled)

    # ----------------------------------------------------------------------------- datasets

    def _layout(self, prompts: np.ndarray, responses: np.ndarray) -> dict[str, np.ndarray]:
        """Trainer arrays for responses [n, N, R] to prompts [n, P]."""
        n, num, _ = responses.shape
        prompt_rep = np.broadcast_to(prompts[:, None, :], (n, num, self.prompt_len))
        input_ids = np.concatenate([prompt_rep, responses], axis=2).astype(np.int32)  # [n, N, T]
        # A response is real up to its EOS; one without EOS fills the budget (all real).
        real = _response_span(responses.reshape(n * num, -1)).reshape(n, num, -1)  # [n, N, R]
        prompt_ones = np.ones((n, num, self.prompt_len), dtype=bool)
        prompt_zeros = np.zeros_like(prompt_ones)
        attention_mask = np.concatenate([prompt_ones, real], axis=2).astype(np.int32)
        loss_mask = np.concatenate([prompt_zeros, real], axis=2).astype(np.int32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "example_id": np.arange(n, dtype=np.int32),
            "prompt": prompts.astype(np.int32),
        }

    def sft_dataset(self, n: int, seed: int, source: str = "base") -> dict[str, np.ndarray]:
        """n prompts with one response each, pair axis N = 1 (see module doc for keys).

        ``gold_reward [n, 1]`` is included so demonstration quality can normalise evaluations
        (the AfD paper scores demonstrations as 1.0).
        """
        prompts = self.sample_prompts(n, seed)
        responses = self.sample_responses(prompts, seed, source)  # [n, R]
        batch = self._layout(prompts, responses[:, None, :])
        batch["gold_reward"] = self.gold_reward(prompts, responses)[:, None]
        return batch

    def preference_dataset(self, n: int, seed: int, source: str = "base") -> dict[str, np.ndarray]:
        """n prompts with a Bradley–Terry-labelled pair each, N = 2 (0 chosen, 1 rejected).

        Two independent responses from ``source``; the first is chosen with probability
        ``σ((r1 − r2) / bt_temperature)`` (one draw per pair from the 'labels' stream). A
        ``DEMO_PAIR_SOURCES`` name instead pairs a demonstration (always chosen) with a response
        from another source.

        Returns:
          The trainer dict plus ``gold_reward [n, 2]`` float32 in (chosen, rejected) order.
        """
        prompts = self.sample_prompts(n, seed)
        if source in DEMO_PAIR_SOURCES:
            demo, other = DEMO_PAIR_SOURCES[source]
            chosen = self._sample(prompts, _rng(seed, f"pairs/{source}/chosen"), demo)
            rejected = self._sample(prompts, _rng(seed, f"pairs/{source}/rejected"), other)
            responses = np.stack([chosen, rejected], axis=1)  # [n, 2, R]
            batch = self._layout(prompts, responses)
            batch["gold_reward"] = np.stack(
                [self.gold_reward(prompts, chosen), self.gold_reward(prompts, rejected)], axis=1
            )
            return batch
        pair_rng = _rng(seed, f"pairs/{source}")
        doubled = np.repeat(prompts, 2, axis=0)  # [2n, P]
        responses = self._sample(doubled, pair_rng, source).reshape(n, 2, -1)  # [n, 2, R]
        rewards = self.gold_reward(doubled, responses.reshape(2 * n, -1)).reshape(n, 2)
        p_first = bt_probability(rewards[:, 0], rewards[:, 1], self.bt_temperature)  # [n]
        first_wins = _rng(seed, f"labels/{source}").random(n) < p_first  # [n]
        order = np.where(first_wins[:, None], [0, 1], [1, 0])  # [n, 2]
        responses = np.take_along_axis(responses, order[:, :, None], axis=1)
        batch = self._layout(prompts, responses)
        batch["gold_reward"] = np.take_along_axis(rewards, order, axis=1).astype(np.float32)
        return batch


def bt_probability(r1: np.ndarray, r2: np.ndarray, temperature: float) -> np.ndarray:
    """Bradley–Terry P(y1 ≻ y2) = σ((r1 − r2) / temperature), float64, [n]."""
    z = (np.asarray(r1, np.float64) - np.asarray(r2, np.float64)) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), overflow-free
