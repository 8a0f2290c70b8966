// The page of `cxrkeras serve`: send each chosen image to the model's `explain` signature over
// TensorFlow Serving's REST API, then draw its probabilities, decision and Grad-CAM overlay.
"use strict";

const modelInfo = document.getElementById("model-info");
const drop = document.getElementById("drop");
const input = document.getElementById("files");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const template = document.getElementById("result-template");
let model = null;

async function loadModel() {
  try {
    const answer = await fetch("/ui/model.json");
    model = await answer.json();
  } catch (error) {
    modelInfo.textContent = `The server did not answer (${error.message}); retrying…`;
  }
  if (!model || !model.ready) {
    if (model) modelInfo.textContent = `Model ${model.name} is loading and warming up…`;
    model = null;
    setTimeout(loadModel, 1000);
    return;
  }
  modelInfo.textContent = describeModel(model);
  if (model.image_size) document.getElementById("image-size").textContent = `${model.image_size} × ${model.image_size}`;
}

function describeModel(m) {
  const thresholds = Object.entries(m.thresholds || {})
    .map(([name, t]) => `${name} > ${Number(t).toFixed(2)}`)
    .join(", then ");
  const rule = thresholds ? `; decides ${thresholds}` : "";
  return `Model “${m.name}”, version ${m.version} of ${m.versions.join(", ")} (${m.kind || "SavedModel"}` +
    `, classes ${(m.class_names || []).join(", ")})${rule}. ${describeStatus(m)}`;
}

function describeStatus(m) {
  const adapted = m.adapted ? `Adapted to ${m.adapted.images} images of its site` : "Not adapted to a site";
  const calibrated = m.calibrated ? "calibrated" : "not calibrated";
  return `${adapted}; ${calibrated}.`;
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function newResult(file) {
  const item = template.content.firstElementChild.cloneNode(true);
  item.querySelector(".file").textContent = file.name;
  item.setAttribute("aria-label", file.name);
  results.append(item);
  return item;
}

function showError(item, message) {
  item.classList.add("failed");
  item.querySelector(".decision").textContent = "Cannot read this image";
  const error = item.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
}

async function classify(file, item) {
  if (file.size > model.max_body_bytes * 0.7) {
    showError(item, `The file is ${(file.size / 2 ** 20).toFixed(1)} MB; this server takes up to ` +
      `${(model.max_body_bytes / 2 ** 20 * 0.7).toFixed(1)} MB per image.`);
    return false;
  }
  const body = {
    signature_name: model.explain ? "explain" : "serving_default",
    instances: [{ b64: await base64Of(file) }],
  };
  let answer;
  let ok = false;
  try {
    const response = await fetch(`/v1/models/${encodeURIComponent(model.name)}/versions/${model.version}:predict`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    answer = await response.json();
    ok = response.ok;
  } catch (error) {
    showError(item, `The server did not answer: ${error.message}`);
    return false;
  }
  if (!ok) {
    showError(item, (answer.error || "The server refused this image.").replace(/^Instance 0: /, ""));
    return false;
  }
  await render(item, answer.predictions[0], file);
  return true;
}

async function render(item, prediction, file) {
  const names = model.class_names || prediction.probabilities.map((_, i) => `class ${i}`);
  const decision = item.querySelector(".decision");
  decision.textContent = "Decision: ";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = prediction.class_name;
  decision.append(label);

  const bars = item.querySelector(".bars");
  prediction.probabilities.forEach((p, i) => {
    const chosen = i === prediction.class_id ? " chosen" : "";
    const term = document.createElement("dt");
    term.className = chosen.trim();
    term.textContent = names[i];
    const bar = document.createElement("dd");
    bar.className = `track-cell${chosen}`;
    bar.innerHTML = '<div class="track"><div class="fill"></div></div>';
    bar.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    const value = document.createElement("dd");
    value.className = "value";
    value.textContent = `${(100 * p).toFixed(1)}%`;
    bars.append(term, bar, value);
  });
  if (prediction.heatmap) {
    item.querySelector(".explained").textContent =
      `Grad-CAM of the ${String(prediction.explained_by).replace(/_/g, " ")}: warm colours weigh most for “${prediction.class_name}”.`;
  }
  await drawOverlay(item.querySelector("canvas"), file, prediction.heatmap);
}

// Heat in [0, 1] -> [r, g, b]: dark blue, cyan, yellow, red.
function heatColour(h) {
  const stops = [[0, 0, 0.55], [0, 0.85, 1], [1, 0.95, 0.1], [0.9, 0.05, 0.05]];
  const x = Math.min(Math.max(h, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const t = x - i;
  return stops[i].map((a, k) => Math.round(255 * (a + (stops[i + 1][k] - a) * t)));
}

// The file as a bitmap: the browser decodes images itself; a DICOM comes back from the server as a PNG
// of the pixels the model sees (windowed, MONOCHROME1 inverted).
async function viewable(file) {
  try {
    return await createImageBitmap(file);
  } catch (error) {
    const answer = await fetch("/ui/image", { method: "POST", body: file });
    if (!answer.ok) throw new Error(`the server could not convert ${file.name}`);
    return await createImageBitmap(await answer.blob());
  }
}

async function drawOverlay(canvas, file, heatmap) {
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  try {
    const bitmap = await viewable(file);
    // The model sees the whole image squeezed to a square, in gray: draw it so.
    context.filter = "grayscale(1)";
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    context.filter = "none";
  } catch (error) {
    // Neither the browser nor the server can show this file; the heatmap alone still says where the model looked.
  }
  if (!heatmap) return;
  const rows = heatmap.length;
  const cols = heatmap[0].length;
  const pixels = new ImageData(cols, rows);
  for (let y = 0; y < rows; y++) {
    for (let x = 0; x < cols; x++) {
      const h = heatmap[y][x];
      const [r, g, b] = heatColour(h);
      const o = 4 * (y * cols + x);
      pixels.data.set([r, g, b, Math.round(255 * 0.6 * h)], o);
    }
  }
  const layer = document.createElement("canvas");
  layer.width = cols;
  layer.height = rows;
  layer.getContext("2d").putImageData(pixels, 0, 0);
  context.imageSmoothingEnabled = true;
  context.drawImage(layer, 0, 0, canvas.width, canvas.height);
}

async function handleFiles(files) {
  const chosen = Array.from(files);
  if (!chosen.length) return;
  if (!model) {
    statusLine.textContent = "The model is not ready yet; try again in a moment.";
    return;
  }
  results.replaceChildren();
  statusLine.textContent = `Classifying ${chosen.length} image${chosen.length > 1 ? "s" : ""}…`;
  const outcomes = await Promise.all(chosen.map((file) => classify(file, newResult(file))));
  const failed = outcomes.filter((ok) => !ok).length;
  statusLine.textContent = `Classified ${chosen.length - failed} of ${chosen.length} image` +
    `${chosen.length > 1 ? "s" : ""}` + (failed ? `; ${failed} could not be read.` : ".");
  input.value = "";
}

input.addEventListener("change", () => handleFiles(input.files));
drop.addEventListener("keydown", (event) => {
  if (event.target === drop && (event.key === "Enter" || event.key === " ")) {
    event.preventDefault();
    input.click();
  }
});
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  handleFiles(event.dataTransfer.files);
});
loadModel();
