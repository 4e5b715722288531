"""`mmel enrich ...`: LLM entity descriptions and image captions (a thin shell over `mmel.enrich`)."""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mmel.cli.errors import exit_on_user_errors
from mmel.core.errors import DataError
from mmel.data import load_dataset
from mmel.enrich.answers import Tally
from mmel.enrich.cache import AnswerCache, default_cache_path
from mmel.enrich.prompts import DescriptionPrompt, load_prompt

if TYPE_CHECKING:
    from mmel.enrich.descriptions import DescriptionBackend

app = typer.Typer(help="Enrich a dataset: LLM entity descriptions (DIM's '+' datasets), image captions.",
                  no_args_is_help=True)

CacheOption = Annotated[Path | None, typer.Option("--cache", help="Answer cache (SQLite); default "
                                                                  "$MMEL_CACHE_DIR or ~/.cache/mmel/enrich.sqlite.")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="Torch device of a local model "
                                                                   "(default: cuda when available, else cpu).")]
NameOption = Annotated[str | None, typer.Option("--name", help="Name of the new dataset.")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


@app.command()
def descriptions(
    dataset: Annotated[Path, typer.Argument(help="Source dataset (mmel JSONL or MIMIC layout); never modified.")],
    out: Annotated[Path, typer.Option("--out", help="New dataset directory (the '+' variant).")],
    base_url: Annotated[str, typer.Option("--base-url", help="OpenAI-compatible API root, e.g. "
                                                             "http://127.0.0.1:11434/v1 (Ollama), "
                                                             "http://127.0.0.1:8000/v1 (vLLM).")
                        ] = "https://api.openai.com/v1",
    model: Annotated[str | None, typer.Option("--model", help="Model name on the endpoint.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="NAME of the environment variable holding the "
                                                                   "API key (the key itself is never an option).")
                           ] = "OPENAI_API_KEY",
    local_model: Annotated[Path | None, typer.Option("--local-model", help="Use a local Hugging Face causal LM "
                                                                           "directory instead of an endpoint.")
                           ] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt", help="YAML prompt (system, user, max_tokens, "
                                                                      "temperature); default: DIM's question.")
                           ] = None,
    cache: CacheOption = None,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Requests in flight at once.")] = 4,
    requests_per_second: Annotated[float, typer.Option("--rps", min=0.001, help="Request rate limit.")] = 5.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for one answer.")] = 120.0,
    max_attempts: Annotated[int, typer.Option(min=1, max=20, help="Tries per entity on 429/5xx/timeouts.")] = 6,
    backoff: Annotated[float, typer.Option(min=0.0, help="First retry delay in seconds, doubled per try "
                                                         "(a Retry-After header wins).")] = 1.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count the requests and tokens a run would "
                                                            "need.")] = False,
    name: NameOption = None,
    device: DeviceOption = None,
    progress: ProgressOption = True,
) -> None:
    """Ask an LLM to describe every KB entity; write a new dataset with the descriptions and enrichment.json."""
    from mmel.enrich.descriptions import describe_dataset, plan_descriptions

    with exit_on_user_errors():
        if local_model is None and not model:
            raise DataError("pass --model NAME (with --base-url for a local server), or --local-model DIR")
        prompt = load_prompt(prompt_file)
        source = load_dataset(dataset)
        cache_path = cache or default_cache_path()
        with AnswerCache(cache_path) as answer_cache:
            if dry_run:
                typer.echo(_dry_run_text(plan_descriptions(source.kb, _model_name(local_model, model), prompt,
                                                           answer_cache).estimate(prompt)))
                return
            backend, endpoint = _description_backend(local_model, model, base_url, api_key_env, prompt, device,
                                                     concurrency, requests_per_second, timeout, max_attempts,
                                                     backoff)
            run = describe_dataset(source, dataset, out, backend, prompt, answer_cache, endpoint=endpoint,
                                   name=name, progress=progress)
    described = sum(bool(entity.extra.get("description_source")) for entity in run.dataset.kb)
    typer.echo(run.tally.summary())
    typer.echo(f"Wrote {out}: {len(run.dataset.kb):,} entities, {described:,} with an LLM description.")
    _exit_on_failures(run.tally, cache_path)


@app.command()
def captions(
    dataset: Annotated[Path, typer.Argument(help="Source dataset (mmel JSONL or MIMIC layout); never modified.")],
    out: Annotated[Path, typer.Option("--out", help="New dataset directory (mentions get a 'caption').")],
    model: Annotated[Path | None, typer.Option("--model", help="Local model directory: BLIP-2 "
                                                               "(Salesforce/blip2-opt-2.7b in DIM) or any image-to-"
                                                               "text model.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text prompt (default: DIM's question for "
                                                                "BLIP-2, none for other models).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512, help="Caption length limit (DIM: 20).")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Images per generate() call.")] = 8,
    cache: CacheOption = None,
    name: NameOption = None,
    device: DeviceOption = None,
    progress: ProgressOption = True,
) -> None:
    """Caption every mention image with a local BLIP-2 (DIM's visual expert) or another image-to-text model."""
    from mmel.enrich.captions import Captioner, caption_dataset

    with exit_on_user_errors():
        if model is None:
            raise DataError("pass --model DIR, a local image-to-text model directory: for DIM's captions run "
                            "`huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir DIR` on a machine "
                            "with network access (mmel never downloads at run time)")
        source = load_dataset(dataset)
        captioner = Captioner(model, prompt=prompt, max_new_tokens=max_new_tokens, device=device)
        cache_path = cache or default_cache_path()
        with AnswerCache(cache_path) as answer_cache:
            run = caption_dataset(source, dataset, out, captioner, answer_cache, batch_size=batch_size, name=name,
                                  progress=progress)
    typer.echo(run.tally.summary())
    typer.echo(f"Mention images: {run.images.summary()}.")
    typer.echo(f"Wrote {out}: {run.mentions_captioned:,} of {run.mentions_with_image:,} mentions with an image "
               "have a caption.")
    _exit_on_failures(run.tally, cache_path)


def _model_name(local_model: Path | None, model: str | None) -> str:
    """The model as cache keys name it, without loading it."""
    if local_model is None:
        return str(model)
    from mmel.enrich.local_models import check_model_dir, model_fingerprint

    return model_fingerprint(check_model_dir(local_model, "--local-model", "Qwen/Qwen2.5-1.5B-Instruct"))


def _description_backend(local_model: Path | None, model: str | None, base_url: str, api_key_env: str,
                         prompt: DescriptionPrompt, device: str | None, concurrency: int,
                         requests_per_second: float, timeout: float, max_attempts: int,
                         backoff: float) -> tuple[DescriptionBackend, str]:
    """The backend that answers the prompts, and the endpoint as provenance names it (no credentials)."""
    if local_model is not None:
        from mmel.enrich.local_lm import LocalChatModel

        backend = LocalChatModel(local_model, max_tokens=prompt.max_tokens, temperature=prompt.temperature,
                                 device=device)
        return backend, f"local:{local_model.resolve().name}"
    from mmel.enrich.chat_client import ChatClient, ClientSettings
    from mmel.enrich.provenance import public_url

    api_key = os.environ.get(api_key_env) or None
    if api_key is None and not _is_loopback(base_url):
        typer.echo(f"note: ${api_key_env} is not set; sending requests without an API key", err=True)
    settings = ClientSettings(concurrency=concurrency, requests_per_second=requests_per_second, timeout_s=timeout,
                              max_attempts=max_attempts, backoff_s=backoff)
    client = ChatClient(base_url, str(model), api_key, settings, prompt.max_tokens, prompt.temperature)
    return client, public_url(base_url)


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dry_run_text(estimate: dict[str, int]) -> str:
    return (f"{estimate['requests']:,} requests would be sent ({estimate['entities']:,} entities, "
            f"{estimate['cached']:,} already cached); about {estimate['prompt_tokens_estimate']:,} prompt tokens "
            f"and at most {estimate['completion_tokens_max']:,} completion tokens.\n" + json.dumps(estimate))


def _exit_on_failures(tally: Tally, cache_path: Path) -> None:
    failed = sum(tally.failed.values())
    if failed:
        typer.echo(f"error: {failed:,} requests failed (see above); rerun the same command to retry them: "
                   f"answers so far are cached in {cache_path}", err=True)
        raise typer.Exit(1)
