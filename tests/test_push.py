"""`hf_lotion.cards.push.push_to_hub` against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py).

Pushes run in this process: `HfApi()` reads `huggingface_hub.constants.ENDPOINT` when it is built, so the
`hub` fixture points that and the file URL template at the server (and the token file and the client's
agent registry cache at tmp_path). Downloads (`from_pretrained(repo_id)`, `ModelCard.load`) run in a fresh process with `HF_ENDPOINT`
set before import, the only reliable way for them (see hub_server.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import traceback

import huggingface_hub
import pytest
import torch
from conftest import VOCAB
from hub_server import HubServer, resolve_url, run_client
from lotion_paths import word_tokenizer
from transformers import AutoModelForCausalLM

import hf_lotion
from hf_lotion import LotionConfig
from hf_lotion.cards.push import PushError, push_to_hub

TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"
ENV_TOKEN = "hf_EnvTokenDoNotLeak9876543210fedcba"


def qat_model(path):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=LotionConfig(bits=4, group_size=32, method="ste"), dtype=torch.float32
    )


def train_one_step(model):
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def packed(tiny_checkpoint, tmp_path_factory):
    """A tiny Llama quantized (4 bits, group 32, STE), trained one step, converted; and its saved folder."""
    model = hf_lotion.convert(train_one_step(qat_model(tiny_checkpoint("llama"))))
    folder = tmp_path_factory.mktemp("packed")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The server, with this process's huggingface_hub pointed at it and no token but the ones a test gives."""
    with HubServer(token=TOKEN) as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"  # file URLs (HEAD checks here)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        yield server


def snapshot(folder) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content hash and mtime (to prove a push left local files untouched)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_folder(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_round_trip_from_pretrained_is_bit_exact_and_the_card_parses(packed, hub, tmp_path):
    model, _ = packed
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"ids": ids, "logits": logits}, tmp_path / "pushed.pt")

    url = push_to_hub(model, "tester/tiny-lotion", tokenizer=word_tokenizer(VOCAB), token=TOKEN)

    assert len(hub.commits) == 1  # model, tokenizer, card and plots in one commit
    commit = hub.commits[0]
    assert url == f"{hub.url}/tester/tiny-lotion/commit/{commit['oid']}"
    assert commit["revision"] == "main" and commit["title"] == "Upload 4-bit ste model (hf-lotion, packed)"
    paths = set(commit["paths"])
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= paths
    assert any(p.startswith("plots/") and p.endswith(".png") for p in paths), paths
    assert hub.kinds().count("commit") == 1 and "preupload" in hub.kinds() and "validate" in hub.kinds()
    pushed_config = json.loads(hub.repos["tester/tiny-lotion"].resolve("main").files["config.json"])
    assert pushed_config["quantization_config"]["format"] == "packed"

    code = f"""
import json, torch
import hf_lotion
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer
saved = torch.load({str(tmp_path / "pushed.pt")!r})
model = AutoModelForCausalLM.from_pretrained("tester/tiny-lotion", dtype=torch.float32).eval()
assert any(isinstance(m, hf_lotion.PackedLinear) for m in model.modules())
with torch.no_grad():
    logits = model(saved["ids"]).logits
torch.save(logits, {str(tmp_path / "pulled.pt")!r})
tokenizer = AutoTokenizer.from_pretrained("tester/tiny-lotion")
card = ModelCard.load("tester/tiny-lotion")
card.validate()  # the server's validate-yaml endpoint
print(json.dumps({{"ids": tokenizer("t7")["input_ids"], "vocab": len(tokenizer), "card": card.data.to_dict(), "text": card.text}}))
"""
    proc = run_client(code, hub.url, tmp_path / "client-home")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert torch.equal(torch.load(tmp_path / "pulled.pt"), logits)  # bit for bit
    assert out["ids"] == [7] and out["vocab"] == VOCAB  # the pushed tokenizer
    assert out["card"]["library_name"] == "transformers" and "hf-lotion" in out["card"]["tags"]
    assert "import hf_lotion" in out["text"]
    assert hub.kinds().count("commit") == 1  # downloading made no commit


def test_latent_model_or_folder_is_refused_before_any_request(tiny_checkpoint, hub, tmp_path):
    model = qat_model(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match=r"latent.*hf_lotion\.convert\(model\) first"):
        push_to_hub(model, "tester/latent", token=TOKEN)
    folder = tmp_path / "latent"
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"latent.*hf_lotion\.convert\(model\) first"):
        push_to_hub(folder, "tester/latent", token=TOKEN)
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")).save_pretrained(plain)
    with pytest.raises(ValueError, match="does not hold an hf-lotion model"):
        push_to_hub(plain, "tester/plain", token=TOKEN)
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        push_to_hub(folder, "bad repo id", token=TOKEN)
    assert hub.requests == []

    before = snapshot(folder)
    push_to_hub(folder, "tester/latent", token=TOKEN, allow_latent=True)  # asked for: pushed as it is
    pushed = hub.repos["tester/latent"].resolve("main").files
    assert json.loads(pushed["config.json"])["quantization_config"]["format"] == "latent"
    assert "README.md" in pushed and snapshot(folder) == before


def test_folder_push_private_branch_message_and_files_untouched(packed, hub, tmp_path):
    _, saved = packed
    folder = copy_folder(saved, tmp_path / "model")
    (folder / "optimizer.pt").write_bytes(b"training state")
    (folder / ".hidden").write_text("x")
    before = snapshot(folder)

    url = push_to_hub(
        folder,
        "tester/tiny-dev",
        private=True,
        revision="dev",
        commit_message="First 4-bit upload",
        token=TOKEN,
    )

    repo = hub.repos["tester/tiny-dev"]
    assert repo.private is True
    assert [c["revision"] for c in hub.commits] == ["dev"] and hub.commits[0]["title"] == "First 4-bit upload"
    assert url.endswith(repo.branches["dev"])
    assert set(repo.resolve("main").files) == {".gitattributes"}  # main keeps only the initial commit
    files = repo.resolve("dev").files
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)  # the card was added
    assert "optimizer.pt" not in files and ".hidden" not in files
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert snapshot(folder) == before  # no card or anything else written into the folder

    create = next(r for r in hub.requests if r["kind"] == "create")
    assert create["authorization"] == f"Bearer {TOKEN}"


def test_unchanged_push_makes_no_commit_and_create_pr_opens_a_pull_request(packed, hub, tmp_path, caplog):
    _, saved = packed
    folder = copy_folder(saved, tmp_path / "model")
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# A card\n")
    first = push_to_hub(folder, "tester/tiny", token=TOKEN)
    with caplog.at_level(logging.INFO, logger="hf_lotion.cards.push"):
        assert push_to_hub(folder, "tester/tiny", token=TOKEN) == first  # unchanged: no empty commit
    assert "Nothing new to push" in caplog.text and "Pushed" not in caplog.text
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# A better card\n")
    url = push_to_hub(folder, "tester/tiny", token=TOKEN, create_pr=True, commit_message="Propose")
    assert url == f"{hub.url}/tester/tiny/discussions/1"
    assert [(c["revision"], c["create_pr"]) for c in hub.commits] == [("main", False), ("refs/pr/1", True)]
    assert hub.commits[1]["paths"] == ["README.md"]  # only what changed goes into the commit


@pytest.fixture
def refusing_endpoint():
    """An endpoint where nothing listens: a bound, never listening socket, so connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


FAILURES = {
    # name: (how to fail, expected fragments of the one-line message, whether the repo was created)
    "unreachable": (
        None,
        ["could not connect to http://127.0.0.1:", "check the network connection", "Nothing was pushed"],
        False,
    ),
    "401": ((401, None), ["401 Unauthorized", "hf auth login", "token=", "Nothing was pushed"], False),
    "403": ((403, "create"), ["403 Forbidden", "write access to tester", "Nothing was pushed"], False),
    "500-create": ((500, "create"), ["500 Internal Server Error", "retry", "Nothing was pushed"], False),
    "500-commit": (
        (500, "commit"),
        ["while committing", "500 Internal Server Error", "exists but holds no new commit"],
        True,
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_give_one_clear_line_and_leave_files_untouched(
    case, packed, hub, tmp_path, monkeypatch, caplog, refusing_endpoint
):
    caplog.set_level(logging.DEBUG)
    how, fragments, created = FAILURES[case]
    _, saved = packed
    folder = copy_folder(saved, tmp_path / "model")
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# A card\n")
    before = snapshot(folder)
    if how is None:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", refusing_endpoint)
    else:
        hub.fail(*how)

    with pytest.raises(PushError) as info:
        push_to_hub(folder, "tester/tiny-fail", token=TOKEN)

    message = str(info.value)
    assert "\n" not in message and message.startswith("Push to tester/tiny-fail failed")
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.repo_created is created
    assert ("tester/tiny-fail" in hub.repos) is created and hub.commits == []
    assert snapshot(folder) == before
    assert not any(r.getMessage().startswith("Pushed") for r in caplog.records)  # no success message
    assert TOKEN not in "".join(traceback.format_exception(info.value))
    assert not any(TOKEN in r.getMessage() for r in caplog.records)


def test_offline_mode_fails_before_any_request(packed, hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match=r"offline mode is on .*unset HF_HUB_OFFLINE.*Nothing was pushed"):
        push_to_hub(packed[1], "tester/offline", token=TOKEN)
    assert hub.requests == []


def test_the_token_never_appears_in_files_logs_or_errors(packed, hub, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    model, saved = packed
    folder = copy_folder(saved, tmp_path / "model")
    push_to_hub(model, "tester/secret-1", tokenizer=word_tokenizer(VOCAB), token=TOKEN)  # from a model
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)  # token=None: huggingface_hub finds it in HF_TOKEN
    hub.token = ENV_TOKEN
    push_to_hub(folder, "tester/secret-2")
    assert {r["authorization"] for r in hub.requests if r["kind"] in ("create", "commit")} == {
        f"Bearer {TOKEN}",
        f"Bearer {ENV_TOKEN}",
    }
    hub.token = TOKEN  # the env token is now rejected: a 401 whose message must not hold it either
    with pytest.raises(PushError, match="401") as info:
        push_to_hub(folder, "tester/secret-3")
    errors = "".join(traceback.format_exception(info.value))

    secrets = (TOKEN, ENV_TOKEN, TOKEN[3:], ENV_TOKEN[3:])
    for secret in secrets:
        assert secret not in errors
        assert not any(secret in r.getMessage() or secret in (r.exc_text or "") for r in caplog.records)
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
        for repo in hub.repos.values():
            for commit in repo.commits.values():
                assert not any(secret.encode() in data for data in commit.files.values())


def test_the_server_answers_the_client_like_the_hub(packed, hub):
    """The endpoints the round trip does not reach, through the real client (a check of hub_server.py)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    push_to_hub(packed[1], "tester/api", token=TOKEN, revision="dev")
    api = HfApi(token=TOKEN)
    assert api.whoami()["name"] == "tester"
    assert {b.name for b in api.list_repo_refs("tester/api").branches} == {"main", "dev"}
    assert [c.title for c in api.list_repo_commits("tester/api", revision="dev")][-1] == "initial commit"
    (info,) = api.get_paths_info("tester/api", ["config.json"], revision="dev")
    assert info.size == len((packed[1] / "config.json").read_bytes())
    assert "plots" in {e.path for e in api.list_repo_tree("tester/api", revision="dev")}
    url = hf_hub_url("tester/api", "config.json", revision="dev")
    assert url == resolve_url(hub.url, "tester/api", "config.json", "dev")
    meta = get_hf_file_metadata(url, token=TOKEN)
    assert meta.commit_hash == hub.repos["tester/api"].branches["dev"] and meta.etag == info.blob_id
    assert api.file_exists("tester/api", "config.json", revision="dev")
    assert not api.file_exists("tester/api", "missing.json", revision="dev")  # X-Error-Code: EntryNotFound
    assert not api.revision_exists("tester/api", "nope")  # RevisionNotFound
    assert not api.repo_exists("tester/missing")  # RepoNotFound
    assert api.model_info("tester/api", revision="dev").card_data["library_name"] == "transformers"


def test_cli_push_prints_where_it_went_or_one_line_on_failure(packed, hub, capsys, monkeypatch):
    from hf_lotion_cli import main

    _, folder = packed
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = snapshot(folder)
    assert main(["push", str(folder), "me/cli", "--private", "--message", "from the CLI"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Pushed {folder} to ") and "me/cli" in out
    assert hub.repos["me/cli"].private is True
    hub.fail(401)
    assert main(["push", str(folder), "me/cli"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # besides progress bars
    assert len(errors) == 1 and errors[0].startswith("hf-lotion: error: Push to me/cli failed")
    assert "401 Unauthorized" in err and "Traceback" not in err and TOKEN not in err
    assert snapshot(folder) == before


def test_lotion_trainer_pushes_the_converted_model_with_its_card(tiny_checkpoint, hub, tmp_path):
    from transformers import TrainingArguments

    from hf_lotion.trainer.recipes import CausalLMBlocks

    blocks = CausalLMBlocks(torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(3)))
    args = dict(max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True)
    with pytest.raises(ValueError, match=r"push_to_hub=True.*hf_lotion\.convert\(trainer\.model\)"):
        hf_lotion.LotionTrainer(
            model=qat_model(tiny_checkpoint("llama")),
            args=TrainingArguments(str(tmp_path / "o"), push_to_hub=True, **args),
        )
    trainer = hf_lotion.LotionTrainer(
        model=qat_model(tiny_checkpoint("llama")),
        args=TrainingArguments(str(tmp_path / "out"), eval_strategy="steps", eval_steps=1, **args),
        train_dataset=blocks,
        eval_dataset=blocks,
    )
    trainer.train()
    with pytest.raises(ValueError, match=r"hf_lotion\.convert\(model\) first"):
        trainer.push_to_hub(repo_id="me/trained", token=TOKEN)
    assert not hub.commits
    hf_lotion.convert(trainer.model)
    given = hf_lotion.CardFacts(base_model="org/base-model")
    url = trainer.push_to_hub(repo_id="me/trained", token=TOKEN, card_facts=given)
    assert given.log_history is None and given.training is None  # the caller's facts are not changed
    assert "me/trained" in url and len(hub.commits) == 1
    files = hub.repos["me/trained"].resolve("main").files
    card = files["README.md"].decode()
    assert "model.safetensors" in files and any(name.startswith("plots/") for name in files)
    # The caller's facts over the run's: the base model given, the steps and learning rate from the run.
    assert "base_model: org/base-model" in card and "learning rate" in card.lower() and "steps**: 2" in card


def test_a_push_removes_the_weights_and_plots_it_replaces(packed, hub, tmp_path):
    """A single model.safetensors left beside a new sharded index would be loaded in preference."""
    model, folder = packed
    push_to_hub(folder, "me/stale", token=TOKEN)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    (sharded / "NOTES.md").write_text("kept")
    push_to_hub(sharded, "me/stale", token=TOKEN)
    files = hub.repos["me/stale"].resolve("main").files
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert sorted(n for n in files if n.endswith(".safetensors")) == sorted(
        p.name for p in sharded.glob("*.safetensors")
    )
    assert "NOTES.md" in files and any(n.startswith("plots/") for n in files)
    assert len(hub.commits) == 2
