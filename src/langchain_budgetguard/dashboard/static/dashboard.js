// budgetguard dashboard: small conveniences on top of pages that work without JavaScript.
// "/" focuses the search box; changing the page size or window submits the form.
(function () {
  "use strict";
  document.addEventListener("keydown", function (event) {
    var search = document.querySelector("input[type=search]");
    if (event.key === "/" && search && document.activeElement !== search) {
      event.preventDefault();
      search.focus();
    }
  });
  document.querySelectorAll("form.controls select").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
})();
