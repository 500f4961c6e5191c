// The runs page: the progress panel and the jobs' states read anew every second (the server reads the
// run's own files each time), so a run started elsewhere, or a closed tab, changes nothing.
(function () {
  const panel = document.getElementById("progress");
  if (!panel) return;
  let running = true;
  async function poll() {
    try {
      const r = await fetch(panel.dataset.url, {credentials: "same-origin"});
      if (r.ok) {
        const p = await r.json();
        panel.innerHTML = p.html;
        for (const job of p.jobs) {
          const row = document.querySelector(`tr.job[data-job="${job.id}"]`);
          if (!row) continue;
          row.querySelector(".state").textContent = job.running ? "running" : `ended, exit ${job.rc ?? "?"}`;
          row.querySelector(".message").textContent = job.message || "";
          row.querySelector(".log").textContent = job.log;
          row.querySelector(".notes").textContent = job.notes;
          if (!job.running) row.querySelectorAll("button.stop").forEach((b) => b.remove());
        }
      }
    } catch (e) { /* the UI restarting: try again */ }
    if (running) setTimeout(poll, 1000);
  }
  window.addEventListener("pagehide", () => { running = false; });
  setTimeout(poll, 1000);
})();
