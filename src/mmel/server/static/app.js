// mmel web page: send a sentence, its mention and an optional image to POST /link; show the ranked entities.
// Plain browser JavaScript, no build step and no external resources. Every value from the server is
// inserted with textContent, never as HTML.
"use strict";

const state = {
  authRequired: false,
  span: null,        // [start, end) of the mention selected in the sentence, or null when typed
  imageUrls: [],     // object URLs of entity images, revoked before the next results
};

const $ = (id) => document.getElementById(id);

function authHeaders() {
  const token = $("token").value.trim();
  return state.authRequired && token ? { Authorization: `Bearer ${token}` } : {};
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((item) => `${(item.loc || []).join(".")}: ${item.msg}`).join("; ");
    }
  } catch (error) {
    // the body was not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function loadServerInfo() {
  try {
    const response = await fetch("/health", { headers: authHeaders() });
    const health = await response.json();
    state.authRequired = health.auth_required;
    $("token-row").hidden = !health.auth_required;
    const index = health.index;
    $("index-info").textContent = index
      ? `${index.entities.toLocaleString()} entities · model ${index.model_type} · backbone ${index.backbone} · ` +
        `first stage ${index.first_stage}` + (index.nil_threshold == null ? "" : ` · NIL threshold ${index.nil_threshold.toFixed(3)} on the top-1 ${index.nil_statistic || "score"}`)
      : `mmel ${health.version}` + (health.auth_required ? " · enter the access token to link" : "");
  } catch (error) {
    $("index-info").textContent = "The server does not answer.";
  }
}

// Selecting text in the sentence fills the mention and remembers its exact span.
function onSentenceSelect() {
  const sentence = $("sentence");
  const start = sentence.selectionStart;
  const end = sentence.selectionEnd;
  if (end <= start) return;
  const selected = sentence.value.slice(start, end);
  const trimmedStart = start + (selected.length - selected.trimStart().length);
  const trimmedEnd = end - (selected.length - selected.trimEnd().length);
  if (trimmedEnd <= trimmedStart) return;
  state.span = [trimmedStart, trimmedEnd];
  $("mention").value = sentence.value.slice(trimmedStart, trimmedEnd);
  showSpan();
}

function showSpan() {
  $("span-info").textContent = state.span ? `characters ${state.span[0]}–${state.span[1]} of the sentence` : "";
}

function spanStillValid() {
  if (!state.span) return false;
  const [start, end] = state.span;
  return $("sentence").value.slice(start, end) === $("mention").value;
}

function onImageChosen() {
  const file = $("image").files[0];
  const preview = $("image-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  $("clear-image").hidden = !file;
  if (file) preview.src = URL.createObjectURL(file);
}

function clearImage() {
  $("image").value = "";
  onImageChosen();
}

function buildRequest() {
  const sentence = $("sentence").value;
  const mention = $("mention").value;
  const topK = Number.parseInt($("top-k").value, 10) || 5;
  if (!sentence.trim()) throw new Error("Type a sentence first.");
  if (!mention.trim()) throw new Error("Select the mention in the sentence, or type it.");
  const file = $("image").files[0];
  const useSpan = spanStillValid();
  if (file) {
    const form = new FormData();
    form.append("sentence", sentence);
    if (useSpan) {
      form.append("span_start", String(state.span[0]));
      form.append("span_end", String(state.span[1]));
    } else {
      form.append("mention", mention);
    }
    form.append("top_k", String(topK));
    form.append("image", file);
    return { body: form, headers: authHeaders() };
  }
  const payload = { sentence, top_k: topK };
  if (useSpan) payload.span = state.span;
  else payload.mention = mention;
  return { body: JSON.stringify(payload), headers: { "Content-Type": "application/json", ...authHeaders() } };
}

async function onSubmit(event) {
  event.preventDefault();
  showError("");
  let request;
  try {
    request = buildRequest();
  } catch (error) {
    showError(error.message);
    return;
  }
  const button = $("link-button");
  button.disabled = true;
  $("status").textContent = "Linking…";
  const started = performance.now();
  try {
    const response = await fetch("/link", { method: "POST", ...request });
    if (!response.ok) {
      showError(await errorMessage(response));
      $("status").textContent = "";
      return;
    }
    const result = await response.json();
    renderResult(result);
    $("status").textContent = `${result.candidates.length} entities in ${Math.round(performance.now() - started)} ms`;
  } catch (error) {
    showError(`The request failed: ${error.message}`);
    $("status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

// Bars show each score within the range of the shown scores (model scores are not probabilities).
function barFraction(value, low, high) {
  if (high <= low) return 1;
  return 0.08 + 0.92 * ((value - low) / (high - low));
}

function renderResult(result) {
  for (const url of state.imageUrls) URL.revokeObjectURL(url);
  state.imageUrls = [];
  $("results-panel").hidden = false;
  $("result-mention").textContent = result.mention.surface;
  $("nil-banner").hidden = !result.nil;
  $("nil-threshold").textContent = result.nil_threshold == null ? "" : result.nil_threshold.toFixed(3);
  $("nil-statistic").textContent = result.nil_statistic || "score";
  const list = $("results");
  list.replaceChildren();
  const scores = result.candidates.map((c) => c.score);
  const low = Math.min(...scores);
  const high = Math.max(...scores);
  result.candidates.forEach((candidate, position) => {
    list.appendChild(renderCandidate(candidate, barFraction(candidate.score, low, high), position === 0 && !result.nil));
  });
}

function renderCandidate(candidate, fraction, isAnswer) {
  const item = $("result-template").content.firstElementChild.cloneNode(true);
  item.dataset.qid = candidate.qid;
  if (isAnswer) item.classList.add("answer");
  item.querySelector(".rank").textContent = `${candidate.rank}.`;
  item.querySelector(".name").textContent = candidate.name;
  item.querySelector(".qid").textContent = candidate.qid;
  item.querySelector(".text").textContent = candidate.text || "(no text)";
  item.querySelector(".score .fill").style.width = `${(100 * fraction).toFixed(1)}%`;
  item.querySelector(".score .value").textContent = candidate.score.toFixed(3);
  const units = item.querySelector(".units");
  for (const [unit, value] of Object.entries(candidate.unit_scores)) {
    const chip = document.createElement("span");
    chip.className = "unit";
    chip.textContent = `${unit} ${value.toFixed(3)}`;
    units.appendChild(chip);
  }
  if (candidate.retrieval_score != null) {
    const chip = document.createElement("span");
    chip.className = "unit retrieval";
    chip.textContent = `retrieval ${candidate.retrieval_score.toFixed(3)}`;
    units.appendChild(chip);
  }
  if (candidate.image_count > 0) loadEntityImage(candidate, item.querySelector(".thumb"));
  return item;
}

// Images go through fetch (not <img src>) so that the bearer token is sent when the server needs one.
async function loadEntityImage(candidate, thumb) {
  try {
    const response = await fetch(`/entities/${encodeURIComponent(candidate.qid)}/image/0`, { headers: authHeaders() });
    if (!response.ok) return;
    const url = URL.createObjectURL(await response.blob());
    state.imageUrls.push(url);
    const image = document.createElement("img");
    image.src = url;
    image.alt = `image of ${candidate.name}`;
    thumb.replaceChildren(image);
  } catch (error) {
    // the entity keeps its "no image" placeholder
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sentence").addEventListener("select", onSentenceSelect);
  $("sentence").addEventListener("mouseup", onSentenceSelect);
  $("sentence").addEventListener("keyup", onSentenceSelect);
  $("mention").addEventListener("input", () => { if (!spanStillValid()) { state.span = null; showSpan(); } });
  $("sentence").addEventListener("input", () => { if (!spanStillValid()) { state.span = null; showSpan(); } });
  $("image").addEventListener("change", onImageChosen);
  $("clear-image").addEventListener("click", clearImage);
  $("token").addEventListener("change", loadServerInfo);
  $("link-form").addEventListener("submit", onSubmit);
  loadServerInfo();
});
