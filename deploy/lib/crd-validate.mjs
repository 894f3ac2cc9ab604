// Validates Prometheus Operator objects (ServiceMonitor, PrometheusRule) against the CRD
// schemas of @kubernetes-models/prometheus-operator (installed by deploy/install-tools.sh).
// Usage: node crd-validate.mjs NODE_MODULES_DIR < objects.json   (a JSON array of objects)
// Prints one line per object; exits 1 if any is invalid or of an unknown kind.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node crd-validate.mjs NODE_MODULES_DIR < objects.json");
  process.exit(2);
}
const v1 = await import(
  pathToFileURL(join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js")).href
);
const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const obj of objects) {
  const name = `${obj.kind}/${obj.metadata?.name}`;
  const Model = obj.apiVersion === "monitoring.coreos.com/v1" ? v1[obj.kind] : undefined;
  if (!Model) {
    console.log(`FAIL ${name}: no schema for ${obj.apiVersion} ${obj.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok   ${name}`);
  } catch (e) {
    console.log(`FAIL ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
