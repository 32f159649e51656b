document.querySelectorAll("table.ll-sortable").forEach(function(table) {
  table.querySelectorAll("th").forEach(function(th, col) {
    th.addEventListener("click", function() {
      const body = table.tBodies[0], rows = Array.from(body.rows);
      const asc = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(h => h.classList.remove("sorted-asc", "sorted-desc"));
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      const key = r => { const v = r.cells[col].dataset.value ?? r.cells[col].textContent; const n = parseFloat(v); return isNaN(n) ? v : n; };
      rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); });
      rows.forEach(r => body.appendChild(r));
    });
  });
});
