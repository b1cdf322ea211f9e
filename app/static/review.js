// Progressive enhancement for the review queue, nothing else: a "select every eligible case
// on this page" box in the header of the select column. The page works without it.
document.addEventListener("DOMContentLoaded", function () {
  var cell = document.querySelector("table.queue th.select");
  var boxes = document.querySelectorAll('table.queue input[name="case_id"]');
  if (!cell || !boxes.length) return;
  var all = document.createElement("input");
  all.type = "checkbox";
  all.setAttribute("aria-label", "Select every eligible case on this page");
  all.addEventListener("change", function () { boxes.forEach(function (b) { b.checked = all.checked; }); });
  cell.appendChild(all);
});
