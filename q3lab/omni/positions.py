"""3-axis positions of a multimodal prompt, as transformers' Qwen3-Omni thinker computes them (`get_rope_index`).

Text advances all three axes together. An image or video gives its merged patches (temporal, height, width)
positions from the position after the text before it: t = frame-grid index * second_per_grid *
position_id_per_seconds (images: t = 0), h and w the patch row and column. Audio tokens advance all three axes
one per token. A video with its audio (use_audio_in_video) puts video and audio tokens in one run, ordered by
their temporal positions (video first on ties). After each block the next position is its maximum + 1, so the
prompt ends at a position `delta` away from its length: decoding continues at text position + delta (the rope
deltas). Positions are float32 (t may be fractional), as in transformers.
"""
from __future__ import annotations

import torch

from q3lab.errors import InputError
from q3lab.omni.inputs import OmniSpec, audio_token_count


def _vision_positions(start: torch.Tensor, grid: torch.Tensor, t_index: torch.Tensor, merge: int) -> torch.Tensor:
    """[3, t*h*w/merge^2] positions of one image/video block starting at `start` (transformers'
    `get_llm_pos_ids_for_vision`)."""
    gh, gw = int(grid[1]) // merge, int(grid[2]) // merge
    nt = len(t_index)
    h = torch.arange(gh).view(1, -1, 1).expand(nt, -1, gw).flatten().float()
    w = torch.arange(gw).view(1, 1, -1).expand(nt, gh, -1).flatten().float()
    t = torch.as_tensor(t_index).view(-1, 1).expand(-1, gh * gw).flatten().float()
    return torch.stack([t, h, w]) + start


def _run(n: int, start) -> torch.Tensor:
    """n positions start, start+1, ... on all three axes [3, n]."""
    return torch.arange(n).view(1, -1).expand(3, -1) + start


def _row_positions(ids: list[int], spec: OmniSpec, image_grid_thw, video_grid_thw, use_audio_in_video: bool,
                   audio_seqlens, second_per_grids, counters: list[int]) -> torch.Tensor:
    """[3, len(ids)] float positions of one unpadded row; `counters` = [image, video, audio] indices into the
    batch's grids and audio lengths, advanced in place (they run across rows, as in transformers)."""
    s = spec
    starts = [i for i, t in enumerate(ids) if t == s.vision_start_token_id]
    after = [ids[i + 1] if i + 1 < len(ids) else None for i in starts]
    n_audio = sum(1 for t in ids if t == s.audio_start_token_id)
    n_image = sum(1 for t in after if t == s.image_token_id)
    n_video = sum(1 for t in after if t == (s.audio_start_token_id if use_audio_in_video else s.video_token_id))
    blocks = n_image + n_audio if use_audio_in_video else n_image + n_video + n_audio
    has_vision_pad = s.image_token_id in ids or s.video_token_id in ids
    has_audio_pad = s.audio_token_id in ids
    remain_img, remain_vid, remain_aud = n_image, n_video, n_audio
    parts: list[torch.Tensor] = []
    st = 0

    def next_start():
        return parts[-1].max() + 1 if parts else 0

    for _ in range(blocks):
        st_idx = next_start()
        end = len(ids) + 1
        ed_vision = ids.index(s.vision_start_token_id, st) if has_vision_pad and (remain_vid > 0 or remain_img > 0) \
            else end
        ed_audio = ids.index(s.audio_start_token_id, st) if has_audio_pad and remain_aud > 0 else end
        min_ed = min(ed_vision, ed_audio)
        if min_ed >= len(ids):
            raise InputError(f"multimodal positions: row has {blocks} media blocks but no start token after "
                             f"index {st} (audio/vision start tokens and pads do not match)")
        text_len = min_ed - st
        if text_len:
            parts.append(_run(text_len, st_idx))
            st_idx = st_idx + text_len
        av = min_ed == ed_vision and ed_vision + 1 == ed_audio        # audio in video: two start tokens
        bos = eos = 2 if av else 1
        parts.append(_run(bos, st_idx))
        st_idx = st_idx + bos
        if min_ed == ed_audio:
            n = audio_token_count(audio_seqlens[counters[2]], s.n_window)
            parts.append(_run(int(n), st_idx))
            st += int(text_len + bos + n + eos)
            counters[2] += 1
            remain_aud -= 1
        elif ids[ed_vision + 1] == s.image_token_id:
            g = image_grid_thw[counters[0]]
            t_index = (torch.arange(int(g[0])) * 1 * s.position_id_per_seconds).float()
            parts.append(_vision_positions(st_idx, g, t_index, s.spatial_merge_size))
            st += int(text_len + bos + int(g.prod()) // s.spatial_merge_size ** 2 + eos)
            counters[0] += 1
            remain_img -= 1
        elif ids[ed_vision + 1] == s.video_token_id:
            g = video_grid_thw[counters[1]]
            t_index = (torch.arange(int(g[0])) * second_per_grids[counters[1]].cpu().float()
                       * s.position_id_per_seconds).float()
            parts.append(_vision_positions(st_idx, g, t_index, s.spatial_merge_size))
            st += int(text_len + bos + int(g.prod()) // s.spatial_merge_size ** 2 + eos)
            counters[1] += 1
            remain_vid -= 1
        elif av:
            n = int(audio_token_count(audio_seqlens[counters[2]], s.n_window))
            audio_pos = _run(n, st_idx)
            g = video_grid_thw[counters[1]]
            t_index = (torch.arange(int(g[0])) * second_per_grids[counters[1]].cpu().float()
                       * s.position_id_per_seconds).float()
            video_pos = _vision_positions(st_idx, g, t_index, s.spatial_merge_size)
            vi = ai = 0
            while vi < video_pos.shape[-1] and ai < audio_pos.shape[-1]:   # by time, video first on ties
                if video_pos[0][vi] <= audio_pos[0][ai]:
                    parts.append(video_pos[:, vi:vi + 1])
                    vi += 1
                else:
                    parts.append(audio_pos[:, ai:ai + 1])
                    ai += 1
            if vi < video_pos.shape[-1]:
                parts.append(video_pos[:, vi:])
            if ai < audio_pos.shape[-1]:
                parts.append(audio_pos[:, ai:])
            st += int(text_len + bos + n + int(g.prod()) // s.spatial_merge_size ** 2 + eos)
            counters[2] += 1
            counters[1] += 1
            remain_vid -= 1
            remain_aud -= 1
        else:
            raise InputError(f"multimodal positions: vision start token at {ed_vision} is followed by token "
                             f"{ids[ed_vision + 1]}, neither an image nor a video pad")
        parts.append(_run(eos, next_start()))
    if st < len(ids):
        parts.append(_run(len(ids) - st, next_start()))
    return torch.cat([p.float() for p in parts], dim=1).reshape(3, -1)


def rope_index(input_ids: torch.Tensor, spec: OmniSpec, *, image_grid_thw: torch.Tensor | None = None,
               video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               use_audio_in_video: bool = False, audio_seqlens: torch.Tensor | None = None,
               second_per_grids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [3, B, T] float32, rope deltas [B, 1]) of a (left-padded) batch, as transformers' thinker
    `get_rope_index`: padded slots get position 1 where there is no image or video, 0 otherwise."""
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if image_grid_thw is None and video_grid_thw is None:   # text (and audio): one axis, counted over real tokens
        pos = mask.float().cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        pos = pos.unsqueeze(0).expand(3, -1, -1)
        deltas = pos.max(0)[0].max(-1, keepdim=True)[0] + 1 - mask.sum(-1, keepdim=True)
        return pos, deltas
    if video_grid_thw is not None and second_per_grids is None:
        raise InputError("video input needs video_second_per_grid (temporal_patch_size / fps, one per video): "
                         "the temporal positions of its frames depend on it")
    keep = mask == 1
    pos = torch.zeros(3, B, T, dtype=torch.float, device=input_ids.device)
    deltas = []
    counters = [0, 0, 0]
    for i in range(B):
        ids = input_ids[i][keep[i]].tolist()
        row = _row_positions(ids, spec, image_grid_thw, video_grid_thw, use_audio_in_video, audio_seqlens,
                             second_per_grids, counters)
        if row.shape[1] != len(ids):
            raise InputError(f"multimodal positions: row {i} has {len(ids)} tokens but its placeholder runs imply "
                             f"{row.shape[1]} (wrong pad counts for the given grids / audio lengths)")
        pos[:, i, keep[i]] = row.to(pos.device)
        deltas.append(row.max() + 1 - len(ids))
    return pos, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
