// The dashboard in a real browser: starts `edgemoe serve --http 127.0.0.1:0` on the built-in
// model, opens its page in headless chromium (playwright-core drives the system's chromium)
// and checks that the page loads with its panels, that a chat message streams its reply, and
// that the expert heat map changes after the request. tools/browser-test.sh runs it.
//
// node dashboard.mjs --bin target/release/edgemoe [--chromium /usr/bin/chromium]
//                    [--screenshot FILE] [-- extra serve arguments]

import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";

function parseArgs(argv) {
  const opts = { bin: "target/release/edgemoe", chromium: "/usr/bin/chromium", screenshot: null, serve: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--") { opts.serve = argv.slice(i + 1); break; }
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${a} needs a value`);
    if (a === "--bin") opts.bin = value;
    else if (a === "--chromium") opts.chromium = value;
    else if (a === "--screenshot") opts.screenshot = value;
    else throw new Error(`unknown argument ${a}`);
    i++;
  }
  return opts;
}

// The server, killed on every way out.
let server = null;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Starts the server; resolves to { child, base } once /health answers 200.
async function startServer(bin, extra) {
  const child = spawn(bin, ["serve", "--http", "127.0.0.1:0", "--threads", "2", ...extra], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  server = child;
  const lines = createInterface({ input: child.stderr });
  const log = [];
  let exited = null;
  child.on("exit", (code) => { exited = `the server exited (${code}): ${log.join("\n")}`; });
  const base = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the server printed no address in 60 s")), 60000);
    child.on("exit", () => reject(new Error(exited)));
    lines.on("line", (line) => {
      log.push(line);
      const m = line.match(/^listening on (http:\/\/\S+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
  });
  const deadline = Date.now() + 120000;
  for (;;) {
    const r = await fetch(base + "/health").catch(() => null);
    if (r && r.status === 200) break;
    if (exited) throw new Error(exited);
    if (Date.now() > deadline) throw new Error("the server never became ready");
    await sleep(50);
  }
  return { child, base };
}

const cellCounts = (page) =>
  page.$$eval("#heatmap rect.cell", (cells) => cells.map((c) => Number(c.dataset.count)));

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const results = [];
  const check = async (name, fn) => {
    try {
      await fn();
      results.push(true);
      console.log(`ok - ${name}`);
    } catch (e) {
      results.push(false);
      console.log(`FAIL - ${name}: ${e.message}`);
    }
  };
  const { base } = await startServer(opts.bin, opts.serve);
  const browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    // Root in CI containers: chromium's sandbox needs user namespaces it may not have.
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 760 } });
    const problems = [];
    const requests = [];
    page.on("pageerror", (e) => problems.push("page error: " + e.message));
    page.on("console", (m) => { if (m.type() === "error") problems.push("console: " + m.text()); });
    page.on("request", (r) => requests.push(r.url()));

    let before = [];
    await check("the page loads with every panel and one heat-map cell per layer x expert", async () => {
      await page.goto(base + "/");
      await page.waitForSelector("#status.ok", { timeout: 20000 });
      for (const id of ["chat", "panel-throughput", "panel-queue", "panel-kv", "panel-experts"]) {
        if (!(await page.isVisible("#" + id))) throw new Error(`#${id} is not visible`);
      }
      const stats = await (await fetch(base + "/v1/stats")).json();
      const want = stats.experts.map.layers.length * stats.experts.map.experts;
      before = await cellCounts(page);
      if (want === 0 || before.length !== want) {
        throw new Error(`${before.length} heat-map cells, the stats report ${want}`);
      }
      const tps = await page.textContent("#tokens-per-s");
      if (!/^\d+\.\d$/.test(tps.trim())) throw new Error(`tokens/s reads "${tps}"`);
      const foreign = requests.filter((u) => !u.startsWith(base));
      if (foreign.length) throw new Error("requests outside the server: " + foreign.join(", "));
      if (problems.length) throw new Error(problems.join("; "));
    });

    let streamed = false;
    await check("a chat message streams a reply", async () => {
      // Records the reply's length at every change, to see it grow in several steps.
      await page.evaluate(() => {
        window.__lengths = [];
        new MutationObserver(() => {
          const last = document.querySelector("#messages .message.assistant:last-child");
          if (last) window.__lengths.push(last.textContent.length);
        }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
      });
      // The server streams (tests/http.rs checks its events at the socket); here the page
      // must show the reply as it arrives. On a busy machine the browser can fall behind a
      // fast server and find the whole stream waiting in one read, so the download is
      // throttled to a slow link: the events then arrive over a second or two.
      const cdp = await page.context().newCDPSession(page);
      await cdp.send("Network.enable");
      await cdp.send("Network.emulateNetworkConditions", {
        offline: false, latency: 0, downloadThroughput: 16 * 1024, uploadThroughput: -1,
      });
      await page.fill("#max-tokens", "128");
      await page.fill("#prompt", "And God said");
      await page.press("#prompt", "Enter");
      const reply = page.locator("#messages .message.assistant").last();
      await page.waitForSelector('#messages .message.assistant:last-child:not([data-state="streaming"])', { timeout: 60000 });
      await cdp.send("Network.emulateNetworkConditions", {
        offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1,
      });
      const state = await reply.getAttribute("data-state");
      const text = (await reply.textContent()).trim();
      if (state !== "done") throw new Error(`the reply ended as ${state}: ${text}`);
      if (!text) throw new Error("the reply is empty");
      const chunks = Number(await reply.getAttribute("data-chunks"));
      const lengths = await page.evaluate(() => window.__lengths);
      const growth = new Set(lengths.filter((n) => n > 0));
      if (chunks < 2 || growth.size < 2) {
        throw new Error(`the reply came in ${chunks} events and ${growth.size} visible steps; expected a stream`);
      }
      const posted = requests.filter((u) => u.endsWith("/v1/chat/completions") || u.endsWith("/v1/completions"));
      if (!posted.length) throw new Error("no request to the OpenAI endpoints");
      console.log(`  reply: ${text.length} characters in ${chunks} events, shown in ${growth.size} steps, via ${new URL(posted[0]).pathname}`);
      streamed = true;
    });

    await check("the heat map changes after the request", async () => {
      if (!streamed) throw new Error("no request ran");
      const total = (a) => a.reduce((x, y) => x + y, 0);
      const was = total(before);
      await page.waitForFunction(
        (was) => [...document.querySelectorAll("#heatmap rect.cell")]
          .reduce((x, c) => x + Number(c.dataset.count), 0) > was,
        was,
        { timeout: 10000 },
      );
      const after = await cellCounts(page);
      const changed = after.filter((n, i) => n !== before[i]).length;
      if (after.length !== before.length || changed === 0) throw new Error("no cell changed");
      if (after.some((n, i) => n < before[i])) throw new Error("a count went down");
      const opacities = await page.$$eval("#heatmap rect.cell", (cs) => cs.map((c) => Number(c.getAttribute("fill-opacity"))));
      const hottest = after.indexOf(Math.max(...after));
      const coldest = after.indexOf(Math.min(...after));
      if (!(opacities[hottest] > opacities[coldest])) throw new Error("the hottest cell is not the most opaque");
      console.log(`  ${changed} of ${after.length} cells changed; tokens routed ${was} -> ${total(after)}`);
    });

    await check("each cell is coloured by its expert's tier", async () => {
      const stats = await (await fetch(base + "/v1/stats")).json();
      const palette = stats.experts.palette;
      const cells = await page.$$eval("#heatmap rect.cell", (cs) => cs.map((c) => [c.dataset.tier, c.getAttribute("fill")]));
      const wrong = cells.filter(([tier, fill]) => palette[tier] !== fill);
      if (wrong.length) throw new Error(`${wrong.length} cells not in their tier's colour`);
      const tiers = new Set(cells.map(([tier]) => tier));
      const legend = await page.$$eval("#legend [data-tier]", (ls) => ls.map((l) => l.dataset.tier));
      if (legend.length !== tiers.size || !legend.every((t) => tiers.has(t))) {
        throw new Error(`the legend shows ${legend} for tiers ${[...tiers]}`);
      }
      // In place every expert is in RAM; paged, some are in slots (RAM) and some only stored.
      const want = stats.experts.paged ? ["ram", "storage"] : ["ram"];
      if (tiers.size !== want.length || !want.every((t) => tiers.has(t))) {
        throw new Error(`tiers shown: ${[...tiers]}; expected ${want}`);
      }
      const hit = await page.textContent("#hit-rate");
      if (stats.experts.paged !== /%$/.test(hit.trim())) throw new Error(`hit rate reads "${hit}"`);
      console.log(`  tiers: ${[...tiers].join(", ")}; hit rate ${hit}`);
    });

    if (opts.screenshot) {
      // Two long requests with a small KV budget, so the KV panel has sequences and evictions.
      const busy = [1, 2, 3, 4].map((i) => fetch(base + "/v1/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: "In the beginning", max_tokens: 500, stream: true, seed: i, kv_budget: 160 }),
      }).then(async (r) => { if (!r.ok) throw new Error(`busy request: HTTP ${r.status} ${await r.text()}`); return r.text(); }));
      await page.waitForFunction(() => document.querySelectorAll("#kv-sequences td:not(.empty)").length > 0, null, { timeout: 10000 });
      // Best effort: a moment when the sequences have started evicting.
      await page.waitForFunction(() => [...document.querySelectorAll("#kv-sequences tbody tr td:last-child")]
        .some((td) => Number(td.textContent) > 0), null, { timeout: 5000 }).catch(() => {});
      await page.screenshot({ path: opts.screenshot });
      console.log(`screenshot: ${opts.screenshot}`);
      await Promise.all(busy);
    }
  } finally {
    await browser.close();
  }
  const passed = results.filter(Boolean).length;
  const failed = results.length - passed;
  console.log(`browser: ${passed} passed, ${failed} failed`);
  process.exitCode = failed === 0 ? 0 : 1;
}

main()
  .catch((e) => {
    console.log(`FAIL - setup: ${e.message}`);
    console.log("browser: 0 passed, 1 failed");
    process.exitCode = 1;
  })
  .finally(() => {
    if (server) server.kill();
  });
