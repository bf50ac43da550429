"""Share links from a page: the Share button (Train, Evaluate, Runs) and the owner's list.

The link is a read-only snapshot of one finished run (`retrain.sessions.share`); the evaluation it
shows is computed by the model workers (`model_answer("evaluate_run", ...)`, the same request
the Evaluate page sends, so it is usually answered from the cache).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import streamlit as st

from pages._service import model_answer
from pages._ui import as_text
from retrain.errors import RetrainError
from retrain.sessions import share

EXPIRY_CHOICES = {24: "1 day", 168: "7 days", 720: "30 days", 2160: "90 days"}


def full_link(url_path: str) -> str:
    """``url_path`` (``/?share=...``) as a whole link on this server, when the browser's
    address is known; else the path alone."""
    base = "/" + str(st.get_option("server.baseUrlPath") or "").strip("/")
    path = (base.rstrip("/") + url_path) if base != "/" else url_path
    try:
        parts = urlsplit(st.context.url or "")
    except (AttributeError, ValueError):
        return path
    return f"{parts.scheme}://{parts.netloc}{path}" if parts.scheme and parts.netloc else path


_CARD_SPECIAL = re.compile(r"([<>\[\]$])")


def card_markdown(card: str) -> str:
    """A model card as Markdown that shows every name in it as text.

    Outside code (fenced blocks and `code spans`, which show their text as is), ``< > [ ] $``
    are escaped: a dataset named ``<img src=x onerror=alert(1)>`` or ``[x](http://...)``
    stays those characters, never a tag, a link or LaTeX.
    """
    lines, fenced = [], False
    for line in card.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append(line)
            continue
        if fenced:
            lines.append(line)
            continue
        parts = line.split("`")
        if len(parts) % 2 == 0:  # an unclosed backtick: treat the whole line as text
            parts = [line.replace("`", "\\`")]
        lines.append(
            "`".join(
                _CARD_SPECIAL.sub(r"\\\1", part) if i % 2 == 0 else part
                for i, part in enumerate(parts)
            )  # fmt: skip
        )
    return "\n".join(lines)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def share_panel(run_dir: Path | str, key: str = "share") -> None:
    """A "Share" popover for a finished run: options, "Create link", and the link made.

    Draws nothing for a run that is not finished.
    """
    run_dir = Path(run_dir)
    workspace = st.session_state.get("workspace")
    try:
        share.check_shareable(run_dir)
    except RetrainError:
        return
    if workspace is None:
        return
    with st.popover("Share", icon=":material/share:", key=f"{key}_popover"):
        st.caption(
            "A read-only link to this run's results: classes, curves, accuracy, the confusion "
            "matrix, the model card and Try it. It never opens your workspace."
        )
        downloads = st.checkbox(
            "Allow downloads (the model, its labels and card)", key=f"{key}_downloads"
        )
        examples = st.checkbox(
            "Include example images (a few held-out images per class)",
            key=f"{key}_examples",
            help="Without it none of your images leaves your workspace.",
        )
        hours = st.selectbox(
            "The link works for",
            list(EXPIRY_CHOICES),
            index=1,
            format_func=EXPIRY_CHOICES.get,
            key=f"{key}_expires",
        )
        made_key = f"_{key}_made_{run_dir.name}"
        if st.button("Create link", key=f"{key}_create", type="primary"):
            report = model_answer(
                "evaluate_run",
                "Scoring the model for the shared page",
                run_dir=str(run_dir),
                split="val",
            )
            card = None
            if report is not None:
                card = model_answer(
                    "share_card",
                    "Writing the model card",
                    run_dir=str(run_dir),
                    evaluation=share.card_evaluation(report),
                )
            if report is not None and card is not None:
                try:
                    made = share.create_share(
                        run_dir,
                        report,
                        owner=share.owner_key(workspace),
                        downloads=downloads,
                        examples=examples,
                        expires_hours=hours,
                        card=card["card"],
                    )
                except RetrainError as err:
                    st.error(str(err))
                else:
                    st.session_state[made_key] = made
        made = st.session_state.get(made_key)
        if made:
            st.success("Link made: anyone with it sees this run, read-only.")
            st.code(full_link(made["url_path"]), language=None)
            st.caption(f"Works until {_when(made['expires'])}. Revoke it on the Runs page.")


def owner_shares(workspace: Path) -> None:
    """The session's live share links, each with a Revoke button (Runs page)."""
    owner = share.owner_key(workspace)
    shares = share.list_shares(owner)
    st.subheader("Shared links")
    if not shares:
        st.caption("No live share links. Share a finished run with its Share button.")
        return
    for record in shares:
        cols = st.columns([2, 5, 2, 1], vertical_alignment="center")
        cols[0].markdown(f"**{as_text(record.get('run_id', '?'))}**")
        cols[1].code(full_link(record["url_path"]), language=None)
        extras = [w for w, on in (("downloads", record.get("downloads")),
                                  ("example images", record.get("examples"))) if on]  # fmt: skip
        cols[2].caption(
            f"until {_when(record['expires'])}" + (f"; with {', '.join(extras)}" if extras else "")
        )
        if cols[3].button("Revoke", key=f"share_revoke_{record['share_id']}"):
            try:
                share.revoke_share(record["share_id"], owner=owner)
            except RetrainError as err:
                st.error(str(err))
            else:
                st.rerun()
