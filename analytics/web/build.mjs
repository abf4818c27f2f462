// The dashboard's reproducible build: src/ -> ../sluice_analytics/static/ (committed). The same
// sources and package-lock give the same bytes (tests/analytics/test_dashboard_build.py): no
// timestamps, no source maps with absolute paths, one output file per kind.
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.env.SLUICE_DASHBOARD_OUT ?? join(here, "..", "sluice_analytics", "static");
mkdirSync(out, { recursive: true });
const uplot = JSON.parse(readFileSync(join(here, "node_modules", "uplot", "package.json"), "utf8"));
// uPlot's notice is a plain comment, which minifying drops: the MIT licence asks for it kept.
const notice = `/*! Sluice dashboard; bundles uPlot ${uplot.version}, Copyright (c) Leon Sorokin, ${uplot.license} licence, https://github.com/leeoniya/uPlot */`;
const common = {
  bundle: true,
  minify: true,
  legalComments: "eof",
  logLevel: "warning",
  charset: "utf8",
  banner: { js: notice, css: notice },
};
await esbuild.build({
  ...common,
  entryPoints: [join(here, "src", "main.ts")],
  outfile: join(out, "app.js"),
  format: "iife",
  target: "es2022",
});
await esbuild.build({ ...common, entryPoints: [join(here, "src", "style.css")], outfile: join(out, "app.css") });
copyFileSync(join(here, "src", "index.html"), join(out, "index.html"));
