// talkgen's page: submit a job, follow its server-sent events, show and offer the video.
// No framework: fetch() for everything (so an API key can travel in the Authorization header,
// which EventSource cannot send), and a small reader for the text/event-stream format.
// While a streaming job runs, its live HLS playlist plays in #live-player through hls.js
// (served from /static/vendor, loaded only when needed; native HLS where there is no MSE).
"use strict";

const $ = (id) => document.getElementById(id);
const STAGES = {
  stored: "Saved a finished part", load: "Loading the model", audio: "Reading the speech", text: "Encoding the prompt", image: "Encoding the portrait",
  condition: "Preparing the first frame", sample: "Generating", decode: "Decoding the video", write: "Writing the mp4",
};
let currentJob = null;
let authRequired = false;
let live = null;  // { jobId, hls } while the live player shows a job's finished part

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || JSON.stringify(body);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function duration(seconds) {
  if (seconds == null) return "";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${seconds % 60} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function describe(job) {
  if (job.status === "queued") return job.attempts ? "Queued again (its worker stopped)…" : "Queued…";
  if (job.status === "succeeded") return `Done: ${job.result.duration_s.toFixed(2)} s of video.`;
  if (job.status === "cancelled") return "Cancelled.";
  if (job.status === "failed") return "Failed.";
  const p = job.progress;
  if (!p) return "Starting…";
  let text = STAGES[p.stage] || p.stage;
  if (p.stage === "sample" && p.total) text += ` (chunk ${p.chunk + 1}, step ${p.step} of ${p.total})`;
  if (p.eta_s != null && p.stage === "sample") text += ` · about ${duration(p.eta_s)} left`;
  if (job.cancel_requested) text += " · cancelling…";
  return text + "…";
}

async function play(url, downloadName) {
  if (authRequired) {  // a <video> cannot send the key: fetch the file, play it from memory
    const response = await fetch(url, { headers: headers() });
    if (!response.ok) { showError(await errorText(response)); return; }
    url = URL.createObjectURL(await response.blob());
  }
  $("player").src = url;
  $("download").href = url;
  $("download").download = downloadName;
  $("result").hidden = false;
}

function showParts(job) {
  const chunks = job.chunks || [];
  $("parts").hidden = chunks.length === 0 || job.status === "succeeded";
  const links = $("part-links");
  while (links.children.length < chunks.length) {
    const chunk = chunks[links.children.length];
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = `${chunk.index + 1}`;
    link.addEventListener("click", (e) => { e.preventDefault(); play(chunk.url, `talkgen-${job.id}-part${chunk.index + 1}.mp4`); });
    links.append(link, " ");
  }
}

// -- the live player: the part of a streaming job finished so far ------------------------------

const HLS_SCRIPT = "/static/vendor/hls.light.min.js";

function loadHls() {
  if (window.Hls) return Promise.resolve(window.Hls);
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = HLS_SCRIPT;
    script.onload = () => resolve(window.Hls);
    script.onerror = () => reject(new Error(`Could not load the HLS player (${HLS_SCRIPT}).`));
    document.head.append(script);
  });
}

function sameOrigin(url) {
  return new URL(url, location.href).origin === location.origin;
}

async function startLive(job) {
  if (live && live.jobId === job.id) return;
  stopLive();
  const mine = { jobId: job.id, hls: null };
  live = mine;
  const video = $("live-player");
  let Hls = null;
  try { Hls = await loadHls(); } catch (_) { /* native HLS may still play it */ }
  if (live !== mine) return;  // another job, or the end, came meanwhile
  if (Hls && Hls.isSupported()) {
    const hls = new Hls({
      startPosition: 0,  // from the beginning: the whole video so far, not the live edge
      // The key goes to this server only (segments may be presigned S3 URLs, which carry their own).
      xhrSetup: (xhr, url) => {
        if (!sameOrigin(url)) return;
        if (!xhr.readyState) xhr.open("GET", url, true);
        for (const [name, value] of Object.entries(headers())) xhr.setRequestHeader(name, value);
      },
    });
    hls.on(Hls.Events.ERROR, (_event, data) => {
      if (!data.fatal) return;
      if (data.type === Hls.ErrorTypes.MEDIA_ERROR) hls.recoverMediaError();
      else setTimeout(() => { if (live === mine) hls.startLoad(); }, 2000);
    });
    hls.loadSource(job.live_url);
    hls.attachMedia(video);
    mine.hls = hls;
  } else if (!authRequired && video.canPlayType("application/vnd.apple.mpegurl")) {
    video.src = job.live_url;  // native HLS (Safari); it cannot send a key
  } else {
    live = null;  // no way to play HLS here: the finished parts' links remain
    return;
  }
  $("live").hidden = false;
}

function stopLive() {
  const video = $("live-player");
  const state = { position: video.currentTime || 0, playing: !video.paused && !video.ended };
  if (live && live.hls) live.hls.destroy();
  live = null;
  video.removeAttribute("src");
  video.load();
  $("live").hidden = true;
  return state;
}

function showLive(job) {
  const chunks = job.chunks || [];
  if (!job.live_url || !chunks.length || job.status === "succeeded") return;
  const seconds = chunks.reduce((sum, c) => sum + c.duration_s, 0);
  $("live-note").textContent = job.status === "running" || job.status === "queued"
    ? `The part finished so far (${seconds.toFixed(2)} s); it grows as the rest is made.`
    : `The part finished before the job ${job.status} (${seconds.toFixed(2)} s).`;
  startLive(job).catch((e) => showError(e.message));
}

function update(job) {
  $("status-box").hidden = false;
  showParts(job);
  showLive(job);
  $("bar").value = job.status === "succeeded" ? 1 : (job.progress ? job.progress.fraction : 0);
  $("status").textContent = describe(job);
  $("status").dataset.status = job.status;
}

async function finish(job) {
  update(job);
  $("cancel").hidden = true;
  $("submit").disabled = false;
  currentJob = null;
  if (job.status === "failed") showError(job.error || "The job failed.");
  if (job.status !== "succeeded") return;
  const watched = live ? stopLive() : null;  // the whole mp4 takes over where the live one was
  await play(job.result.video_url, `talkgen-${job.id}.mp4`);
  if (watched && watched.position > 0) {
    const player = $("player");
    const resume = () => {
      player.currentTime = Math.min(watched.position, player.duration || watched.position);
      if (watched.playing) player.play().catch(() => {});
    };
    if (player.readyState >= 1) resume();
    else player.addEventListener("loadedmetadata", resume, { once: true });
  }
}

// Server-sent events over fetch: frames end with a blank line; we need "event" and "data".
async function follow(jobId) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: { ...headers(), Accept: "text/event-stream" } });
  if (!response.ok || !response.body) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;  // a keep-alive comment
      const job = JSON.parse(data.join("\n"));
      if (event === "end") { await finish(job); return; }
      update(job);
    }
  }
  // The stream ended early (server restart, proxy timeout): ask once more, then follow again.
  const response2 = await fetch(`/v1/jobs/${jobId}`, { headers: headers() });
  const job = await response2.json();
  if (["succeeded", "failed", "cancelled"].includes(job.status)) await finish(job);
  else { update(job); setTimeout(() => follow(jobId).catch((e) => showError(e.message)), 1000); }
}

function parseBox(text, field) {
  if (!text.trim()) return null;
  const numbers = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (numbers.length !== 4 || numbers.some((n) => !Number.isFinite(n))) {
    throw new Error(`${field}: write four numbers x1, y1, x2, y2 (pixels of the portrait).`);
  }
  return numbers;
}

function collect() {
  const image = $("image").files[0];
  const audio = $("audio").files[0];
  if (!image) throw new Error("Choose a portrait image.");
  if (!audio) throw new Error("Choose the speech (an audio file).");
  const form = new FormData();
  form.append("image", image);
  form.append("audio", audio);
  const params = { preset: $("preset").value };
  const prompt = $("prompt").value.trim();
  if (prompt) params.prompt = prompt;
  if ($("steps").value) params.sample_steps = Number($("steps").value);
  if ($("frames").value) params.frame_num = Number($("frames").value);
  if ($("seed").value) params.seed = Number($("seed").value);
  if ($("streaming").checked) params.mode = "streaming";
  if ($("two-speakers").checked) {
    const audio2 = $("audio2").files[0];
    if (!audio2) throw new Error("Choose the speech of speaker 2, or untick 'Second speaker'.");
    form.append("audio2", audio2);
    params.audio_type = $("audio-type").value;
    const box1 = parseBox($("bbox1").value, "Box of speaker 1");
    const box2 = parseBox($("bbox2").value, "Box of speaker 2");
    if (box1 || box2) {
      if (!(box1 && box2)) throw new Error("Give both boxes, or neither.");
      params.bbox = { person1: box1, person2: box2 };
    }
  }
  form.append("params", JSON.stringify(params));
  return form;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  $("result").hidden = true;
  let form;
  try { form = collect(); } catch (e) { showError(e.message); return; }
  if (authRequired) localStorage.setItem("talkgen-api-key", $("api-key").value.trim());
  $("submit").disabled = true;
  stopLive();
  const response = await fetch("/v1/jobs", { method: "POST", body: form, headers: headers() });
  if (response.status !== 202) {
    showError(await errorText(response));
    $("submit").disabled = false;
    return;
  }
  const created = await response.json();
  currentJob = created.id;
  $("cancel").hidden = false;
  $("part-links").textContent = "";
  update({ id: created.id, status: "queued", attempts: 0, chunks: [] });
  follow(created.id).catch((e) => { showError(e.message); $("submit").disabled = false; });
}

async function cancel() {
  if (!currentJob) return;
  const response = await fetch(`/v1/jobs/${currentJob}`, { method: "DELETE", headers: headers() });
  if (!response.ok) showError(await errorText(response));
}

async function init() {
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("two-speakers").addEventListener("change", (e) => { $("speaker2").hidden = !e.target.checked; });
  try {
    const health = await (await fetch("/v1/health")).json();
    authRequired = health.auth_required;
    $("key-row").hidden = !authRequired;
    $("api-key").value = localStorage.getItem("talkgen-api-key") || "";
    const busy = health.workers.length;
    $("server").textContent = `Model: ${health.model} · ${health.queue} queue · ${busy} worker${busy === 1 ? "" : "s"}` +
      (health.status === "ok" ? "" : ` · ${health.status}`);
    const presets = await (await fetch("/v1/presets")).json();
    for (const preset of presets) {
      const option = document.createElement("option");
      option.value = preset.name;
      option.textContent = preset.name.replace("_", " ");
      option.dataset.note = preset.note;
      $("preset").append(option);
    }
    const note = () => { $("preset-note").textContent = $("preset").selectedOptions[0]?.dataset.note || ""; };
    $("preset").addEventListener("change", note);
    note();
  } catch (e) {
    showError(`The server does not answer: ${e.message}`);
  }
  document.body.dataset.ready = "1";
}

init();
