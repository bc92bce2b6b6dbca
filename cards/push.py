"""Publish a packed hf-lotion model (weights, tokenizer, card and plots) to the Hugging Face Hub in one commit.

The token comes from the `token` argument or, when it is None, from where huggingface_hub looks itself
(`HF_TOKEN`, then the token stored by `hf auth login`). It is passed to huggingface_hub only: never written to
a file, a log record or an error message.

Failures of the network part (an offline machine, an unreachable endpoint, 401, 403, 404, 5xx, metadata the Hub
rejects) raise `PushError`, a `RuntimeError` whose message is one line saying what failed and what to do, and
whether the repository was created without a new commit. Bad input (a latent model, a folder that holds no
packed hf-lotion model, an invalid repo id) raises `ValueError` before any network call. Local files are
never changed: the model is saved, and a missing card is written, into a temporary folder.

Example:
    >>> import hf_lotion
    >>> hf_lotion.convert(model)  # doctest: +SKIP
    >>> from hf_lotion.cards.push import push_to_hub
    >>> push_to_hub(model, "me/tiny-llama-4bit", tokenizer=tokenizer)  # doctest: +SKIP
    'https://huggingface.co/me/tiny-llama-4bit/commit/...'
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["PushError", "push_to_hub"]

CONVERT_FIRST = (
    "call hf_lotion.convert(model) first (and save_pretrained again for a folder) to publish the packed model, "
    "or pass allow_latent=True to publish the latent training checkpoint as it is"
)
# Files a Trainer output folder holds that are training state, not part of a published model.
TRAINING_STATE = re.compile(
    r"(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|trainer_state\.json)"
)
SERVER_MESSAGE_CHARS = 200


class PushError(RuntimeError):
    """A push to the Hub failed. The message is one line: what failed, what to do, and what state is left.

    Attributes:
        status: the HTTP status the Hub answered, or None (no answer: offline, unreachable, ...).
        step: what was being done: "creating the repository", "creating the branch" or "committing".
        repo_created: whether create_repo succeeded (the repository exists, new or not) before the failure, so
            the repository is there but holds no commit from this push.
    """

    def __init__(
        self, message: str, *, status: int | None = None, step: str = "", repo_created: bool = False
    ):
        super().__init__(message)
        self.status = status
        self.step = step
        self.repo_created = repo_created


def push_to_hub(
    model_or_dir: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    card_facts: Any = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    allow_latent: bool = False,
    create_pr: bool = False,
) -> str:
    """Publish a converted model, or a folder holding one, to the Hub as one commit; return the commit URL.

    Args:
        model_or_dir: a model converted with `hf_lotion.convert` (saved with `save_pretrained` into a temporary
            folder, with the model card from `hf_lotion.cards.card.save_card`), or a local folder written by
            `save_pretrained` whose config.json holds a packed hf-lotion `quantization_config`. A folder's
            files are pushed as they are (hidden files, `checkpoint-*` folders and Trainer state files are
            left out); a card is added when it has no README.md, or written anew when `card_facts` is given.
        repo_id: ``"namespace/name"`` (or ``"name"``, for the token's user).
        tokenizer: saved next to the model (it replaces a folder's tokenizer files).
        card_facts: a `hf_lotion.cards.card.CardFacts` with what the model does not know (base model, data,
            results, loss curves); None writes the card from the model alone.
        private: create the repository private (True) or public (False); None: the Hub's default. Ignored
            when the repository exists already.
        revision: the branch to commit to, created from main when it does not exist; None: main.
        commit_message: the commit's title; None: "Upload <bits>-bit <method> model (hf-lotion, packed)".
        token: a Hub token; None: `HF_TOKEN` or the token stored by `hf auth login`.
        allow_latent: publish a model or folder still in the latent (training) format.
        create_pr: open a pull request with the commit instead of committing to the branch.

    Returns:
        The commit's URL (the pull request's URL with create_pr=True).

    Raises:
        ValueError: bad input, found before any network call.
        PushError: the Hub could not be reached or refused a request; the message says what to do.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    _check_arguments(repo_id, revision, commit_message, token, validate_repo_id)
    if private is not None and not isinstance(private, bool):
        raise ValueError(f"private must be True, False or None (the Hub's default), got {private!r}")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(
            f"tokenizer must have save_pretrained (a transformers tokenizer), got {type(tokenizer).__name__}"
        )
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(model_or_dir)
        quant = _check_folder(folder, allow_latent)
        model = None
    else:
        folder = None
        model = model_or_dir
        quant = _check_model(model, allow_latent)
    message = commit_message or _default_message(quant)
    if constants.is_offline_mode():
        raise PushError(
            f"Push to {repo_id} failed: offline mode is on (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE and "
            "retry. Nothing was pushed; local files are untouched."
        )

    with tempfile.TemporaryDirectory(prefix="hf-lotion-push-") as staging_dir:
        staging = Path(staging_dir)
        files = _stage(model, folder, staging, tokenizer, card_facts, repo_id)
        return _send(files, repo_id, private, revision, message, token, create_pr)


# -- input checks (no network) --------------------------------------------------------------------------------
def _check_arguments(repo_id, revision, commit_message, token, validate_repo_id) -> None:
    if not isinstance(repo_id, str):
        raise ValueError(f"repo_id must be a string like 'namespace/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        detail = " ".join(str(err).split())
        raise ValueError(
            f"repo_id {repo_id!r} is not a valid Hub repo id ('namespace/name'): {detail}"
        ) from None
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision must be a branch name or None, got {revision!r}")
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise ValueError("commit_message must be a non-empty string or None")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("token must be a non-empty string or None (None: HF_TOKEN or `hf auth login`)")


def _quant_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def _check_model(model: Any, allow_latent: bool) -> dict:
    from hf_lotion.nn import is_lotion_model

    if not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(
            f"push_to_hub takes a transformers model or a folder written by save_pretrained, got "
            f"{type(model).__name__}"
        )
    if getattr(model, "peft_config", None) or any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError(
            "The model carries PEFT adapters: push_to_hub publishes whole packed models. Call "
            "`model = model.merge_and_unload()` and then hf_lotion.convert(model) (QAT adapters merge exactly), "
            "or publish the adapter alone with the PeftModel's own push_to_hub."
        )
    quant = _quant_dict(getattr(getattr(model, "config", None), "quantization_config", None))
    latent = is_lotion_model(model)
    if latent and not allow_latent:
        raise ValueError(f"The model is still in the latent (training) format: {CONVERT_FIRST}.")
    if not latent and (quant is None or quant.get("quant_method") != "lotion"):
        raise ValueError(
            "The model is not an hf-lotion model (its config has no lotion quantization_config): quantize it "
            "with hf_lotion.LotionConfig, train, and call hf_lotion.convert(model) before pushing."
        )
    return quant or {}


def _check_folder(folder: Path, allow_latent: bool) -> dict:
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder: pass a converted model or a folder written by save_pretrained"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: pass a folder written by model.save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not readable JSON ({err})") from None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "lotion":
        raise ValueError(
            f"{folder} does not hold an hf-lotion model (config.json has no quantization_config with "
            'quant_method "lotion"): train with hf_lotion.LotionConfig, convert, and save_pretrained it first.'
        )
    if quant.get("format", "latent") != "packed" and not allow_latent:
        raise ValueError(
            f"{folder} holds a latent (training) checkpoint, not a packed model: {CONVERT_FIRST}."
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"{folder} holds no *.safetensors weights: save the model there with save_pretrained"
        )
    return quant


def _default_message(quant: dict) -> str:
    bits, method = quant.get("bits"), quant.get("method")
    what = " ".join(part for part in (f"{bits}-bit" if bits else "", str(method) if method else "") if part)
    form = quant.get("format", "packed")
    return f"Upload {what + ' ' if what else ''}model (hf-lotion, {form})"


# -- staging (local, in a temporary folder) -------------------------------------------------------------------
def _folder_files(folder: Path) -> dict[str, Path]:
    """The files of a saved-model folder to publish, by their path in the repo."""
    files, skipped = {}, []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        parts = rel.parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or parts[0].startswith("checkpoint-"):
            if len(parts) == 1:
                skipped.append(rel.as_posix())
            continue
        if path.is_file():
            if len(parts) == 1 and TRAINING_STATE.fullmatch(parts[0]):
                skipped.append(rel.as_posix())
                continue
            files[rel.as_posix()] = path
    if skipped:
        logger.info(
            "Not pushed from %s (hidden files, checkpoints, training state): %s", folder, ", ".join(skipped)
        )
    return files


def _write_card(model: Any, staging: Path, card_facts: Any, repo_id: str) -> dict[str, Path]:
    import dataclasses

    from .card import CardFacts, save_card

    if card_facts is None:
        card_facts = CardFacts(repo_id=repo_id)
    elif dataclasses.is_dataclass(card_facts) and getattr(card_facts, "repo_id", None) is None:
        card_facts = dataclasses.replace(card_facts, repo_id=repo_id)  # the card's title and loading snippet
    written = save_card(model, staging, card_facts)
    return {Path(p).resolve().relative_to(staging.resolve()).as_posix(): Path(p) for p in written}


def _load_for_card(folder: Path) -> Any:
    """The folder's model, loaded to describe it in a card (needs hf_lotion imported, which it is here)."""
    from transformers import AutoModelForCausalLM

    import hf_lotion  # noqa: F401  (registers quant_method "lotion")

    try:
        return AutoModelForCausalLM.from_pretrained(folder)
    except Exception as err:
        raise ValueError(
            f"{folder} has no README.md and its model could not be loaded to write one "
            f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); add a README.md (hf_lotion.cards.card."
            "save_card) or push the model object instead"
        ) from err


def _stage(model, folder, staging: Path, tokenizer, card_facts, repo_id) -> dict[str, Path]:
    """Everything to commit, by path in the repo; what is written goes into `staging` only."""
    if model is not None:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _write_card(model, staging, card_facts, repo_id)
        files = {p.relative_to(staging).as_posix(): p for p in sorted(staging.rglob("*")) if p.is_file()}
    else:
        files = _folder_files(folder)
        if tokenizer is not None:
            tokenizer_dir = staging / "tokenizer"
            tokenizer.save_pretrained(tokenizer_dir)
            files.update(
                {p.relative_to(tokenizer_dir).as_posix(): p for p in tokenizer_dir.iterdir() if p.is_file()}
            )
        if card_facts is not None or "README.md" not in files:
            # A new card brings its own plots: the folder's earlier ones would be stale.
            files = {p: f for p, f in files.items() if not p.startswith("plots/")}
            card_dir = staging / "card"
            card_dir.mkdir()
            files.update(_write_card(_load_for_card(folder), card_dir, card_facts, repo_id))
    size = sum(p.stat().st_size for p in files.values())
    logger.info("Staged %d files (%.1f MB) for the push", len(files), size / 1e6)
    return files


# -- the network part -----------------------------------------------------------------------------------------
def _send(files: dict[str, Path], repo_id, private, revision, message, token, create_pr) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    step, repo_created = "creating the repository", False
    try:
        logger.info("Creating the repository %s on %s (if missing)", repo_id, api.endpoint)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = repo_url.repo_id or repo_id
        repo_created = True
        if private:  # create_repo(exist_ok=True) leaves an existing repository's visibility as it is
            step = "reading the repository"
            info = api.model_info(
                repo_id, revision=revision if revision and _is_ref_or_oid(revision) else None
            )
        if private and not info.private:
            logger.warning(
                "%s exists and is public: private=True does not change an existing repository.", repo_id
            )
        if revision is not None and revision != "main" and not _is_ref_or_oid(revision):
            step = "creating the branch"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "committing"
        operations = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in sorted(files.items())
        ]
        # Weights, shard indexes and plots of an earlier push that this one does not replace: an old
        # model.safetensors beside a new sharded index would be loaded in preference.
        remote = _remote_files(api, repo_id, revision)
        stale = [p for p in remote if p not in files and _replaced_by_a_push(p)]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        logger.info(
            "Committing %d files to %s%s", len(operations), repo_id, f"@{revision}" if revision else ""
        )
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except Exception as err:  # every failure becomes one clear PushError
        error = _push_error(err, step, repo_id, revision, repo_created, api.endpoint, token)
        logger.debug("Push failed: %s", _clean(repr(err), token))
        raise error from None  # the raw exception may echo credentials; its cleaned repr is logged
    url = str(info.pr_url if create_pr and info.pr_url else info.commit_url)
    unchanged = not stale and all(
        getattr(op, "_remote_oid", None) == getattr(op, "_local_oid", 0) for op in operations
    )
    if unchanged:  # huggingface_hub skips an empty commit and answers with the branch's head
        logger.warning("Nothing new to push: %s already holds these %d files (%s)", repo_id, len(files), url)
    else:
        logger.info("Pushed %d files to %s in one commit: %s", len(files), repo_id, url)
    return url


def _remote_files(api: Any, repo_id: str, revision: str | None) -> list[str]:
    """The files at the revision pushed to (none on a branch that does not exist yet)."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return list(api.list_repo_files(repo_id, revision=revision, repo_type="model"))
    except RevisionNotFoundError:
        return []


def _replaced_by_a_push(path: str) -> bool:
    """Files a push owns: weights, their index and the card's plots (never e.g. a user's own docs)."""
    return path.endswith((".safetensors", ".safetensors.index.json", ".bin")) or path.startswith("plots/")


def _is_ref_or_oid(revision: str) -> bool:
    return revision.startswith("refs/") or re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def _clean(text: str, token: str | None) -> str:
    """One line, short, and without the token (whichever place it came from)."""
    secrets = {t for t in (token, _stored_token()) if t}
    for secret in secrets:
        text = text.replace(secret, "***")
    text = re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)
    text = " ".join(text.split())
    return text if len(text) <= SERVER_MESSAGE_CHARS else text[: SERVER_MESSAGE_CHARS - 3] + "..."


def _stored_token() -> str | None:
    """The token huggingface_hub would use when none is passed, read without any network call."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    try:
        from huggingface_hub import constants

        return Path(constants.HF_TOKEN_PATH).read_text().strip() or None
    except Exception:  # no stored token
        return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "no answer" errors (connection refused, DNS failure, timeout, proxy, TLS)."""
    errors: list[type[BaseException]] = [ConnectionError]
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def _push_error(err, step, repo_id, revision, repo_created, endpoint, token) -> PushError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
    status = None
    if isinstance(err, OfflineModeIsEnabled):
        what, todo = "offline mode is on (HF_HUB_OFFLINE is set)", "unset HF_HUB_OFFLINE and retry"
    elif isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
        status = err.response.status_code
        reason = err.response.reason_phrase or ""
        said = _clean(err.server_message or "", token) if getattr(err, "server_message", None) else ""
        said = f' (the Hub said: "{said}")' if said else ""
        if status == 401:
            what = f"401 Unauthorized: the token was rejected or is missing{said}"
            todo = "log in with `hf auth login`, set HF_TOKEN, or pass token=... (a token with write access)"
        elif status == 403:
            what = f"403 Forbidden: the token may not write to the namespace {namespace}{said}"
            todo = (
                f"use a token with write access to {namespace} (a fine-grained token needs write permission on "
                "it), or push to a namespace you own"
            )
        elif status == 404:
            target = f"{repo_id}@{revision}" if revision else repo_id
            what = f"404 Not Found: {target} was not found{said}"
            todo = "check repo_id and revision, and that the token can see the repository"
        elif status == 429:
            what, todo = f"429 Too Many Requests: rate limited{said}", "wait a few minutes and retry"
        elif status >= 500:
            what = f"{status} {reason}: the Hub had a server error{said}".replace("  ", " ")
            todo = "this is on the Hub's side: retry in a few minutes (https://status.huggingface.co)"
        else:
            what = f"{status} {reason}{said}".replace("  ", " ")
            todo = "check repo_id, revision and the model card, then retry"
    elif isinstance(err, _transport_errors()):
        detail = _clean(str(err), token)
        what = f"could not connect to {endpoint} ({type(err).__name__}{': ' + detail if detail else ''})"
        todo = "check the network connection (and HF_ENDPOINT, if set), then retry"
    elif isinstance(err, ValueError) and "metadata" in str(err):
        what = f"the Hub rejected the model card's metadata ({_clean(str(err), token)})"
        todo = "fix the card (card_facts) and retry"
    else:
        what = f"unexpected {type(err).__name__}: {_clean(str(err), token)}"
        todo = "retry; if it persists, report it with the log (logging at DEBUG level)"
    if repo_created:
        state = f"The repository {repo_id} exists but holds no new commit from this push; local files are untouched."
    else:
        state = "Nothing was pushed; local files are untouched."
    logger.debug("Push failed while %s: %s", step, _clean(repr(err), token))
    return PushError(
        f"Push to {repo_id} failed while {step}: {what}; {todo}. {state}",
        status=status,
        step=step,
        repo_created=repo_created,
    )
