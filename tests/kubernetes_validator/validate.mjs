// Validates Kubernetes objects against the schemas of their kinds (run by tests/test_kubernetes.py).
//
// Input (stdin): a JSON list of objects. Output (stdout): a JSON list with, for each object, its
// apiVersion, kind, name and a list of errors (empty when valid). Two checks per object:
//
// 1. The OpenAPI schema of its kind, as compiled by the @kubernetes-models packages:
//    monitoring.coreos.com/v1 PodMonitor, ServiceMonitor, PrometheusRule and Prometheus from
//    prometheus-operator's API types (the types and validation markers controller-gen turns into
//    the CRDs); v1 Service and apps/v1 Deployment from Kubernetes' OpenAPI; keda.sh/v1alpha1
//    ScaledObject from KEDA's API types. Types, required fields, enums and patterns (durations, for
//    example) are checked.
// 2. The TypeScript interfaces generated from the same types, with the compiler's excess-property
//    check: an unknown field (a misspelt key) is an error, as `kubectl apply` (strict field
//    validation) makes it, where the OpenAPI schemas alone would let the API server drop it.
//
// Exit status: 0 when the input was read (whatever the verdicts), 2 on unreadable input.

import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { Prometheus } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/Prometheus";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { Service } from "kubernetes-models/v1/Service";
import ts from "typescript";

const HERE = path.dirname(fileURLToPath(import.meta.url));

// apiVersion/kind -> the model class, and the module and interface its TypeScript type comes from.
const KINDS = {
  "monitoring.coreos.com/v1/PodMonitor": {
    model: PodMonitor,
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
    type: "IPodMonitor",
  },
  "monitoring.coreos.com/v1/ServiceMonitor": {
    model: ServiceMonitor,
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
    type: "IServiceMonitor",
  },
  "monitoring.coreos.com/v1/Prometheus": {
    model: Prometheus,
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/Prometheus",
    type: "IPrometheus",
  },
  "monitoring.coreos.com/v1/PrometheusRule": {
    model: PrometheusRule,
    module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
    type: "IPrometheusRule",
  },
  "v1/Service": { model: Service, module: "kubernetes-models/v1/Service", type: "IService" },
  "apps/v1/Deployment": { model: Deployment, module: "kubernetes-models/apps/v1/Deployment", type: "IDeployment" },
  "keda.sh/v1alpha1/ScaledObject": {
    model: ScaledObject,
    module: "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
    type: "IScaledObject",
  },
};

function kindOf(object) {
  return `${object?.apiVersion}/${object?.kind}`;
}

function schemaErrors(object) {
  const known = KINDS[kindOf(object)];
  if (!known) {
    return [`no schema for apiVersion ${object?.apiVersion} kind ${object?.kind}`];
  }
  try {
    new known.model(object).validate();
    return [];
  } catch (error) {
    return String(error.message)
      .split(/, (?=data)/)
      .map((message) => `schema: ${message}`);
  }
}

// One statement per line, `const m<i>: <Interface> = <object>;`, so a diagnostic's line names its object.
function typeErrors(objects) {
  const errors = objects.map(() => []);
  const typed = objects.map((object, index) => [index, KINDS[kindOf(object)]]).filter(([, known]) => known);
  if (typed.length === 0) {
    return errors;
  }
  const modules = [...new Set(typed.map(([, known]) => known.module))];
  const header = modules.map((module, number) => {
    const names = typed.filter(([, known]) => known.module === module).map(([, known]) => known.type);
    return `import type { ${[...new Set(names)].join(", ")} } from "${module}"; // ${number}`;
  });
  const lineOf = new Map();
  const body = typed.map(([index, known], position) => {
    lineOf.set(header.length + position, index);
    return `export const m${index}: ${known.type} = ${JSON.stringify(objects[index])};`;
  });
  const fileName = path.join(HERE, "__manifests__.mts");
  const source = [...header, ...body].join("\n") + "\n";
  const options = {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    skipLibCheck: true,
    types: [],
  };
  const host = ts.createCompilerHost(options);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (name, languageVersion, ...rest) =>
    path.resolve(name) === fileName
      ? ts.createSourceFile(name, source, languageVersion, true)
      : getSourceFile(name, languageVersion, ...rest);
  const fileExists = host.fileExists.bind(host);
  host.fileExists = (name) => path.resolve(name) === fileName || fileExists(name);
  const readFile = host.readFile.bind(host);
  host.readFile = (name) => (path.resolve(name) === fileName ? source : readFile(name));
  const program = ts.createProgram({ rootNames: [fileName], options, host });
  for (const diagnostic of ts.getPreEmitDiagnostics(program)) {
    const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, " ");
    if (!diagnostic.file || path.resolve(diagnostic.file.fileName) !== fileName) {
      errors.forEach((list) => list.push(`typescript: ${message}`));
      continue;
    }
    const { line } = diagnostic.file.getLineAndCharacterOfPosition(diagnostic.start ?? 0);
    const index = lineOf.get(line);
    if (index === undefined) {
      errors.forEach((list) => list.push(`typescript: ${message}`));
    } else {
      errors[index].push(`fields: ${message}`);
    }
  }
  return errors;
}

let objects;
try {
  objects = JSON.parse(readFileSync(0, "utf8"));
  if (!Array.isArray(objects)) {
    throw new Error("expected a JSON list of objects");
  }
} catch (error) {
  process.stderr.write(`cannot read the objects: ${error.message}\n`);
  process.exit(2);
}
const fieldErrors = typeErrors(objects);
const report = objects.map((object, index) => ({
  apiVersion: object?.apiVersion ?? null,
  kind: object?.kind ?? null,
  name: object?.metadata?.name ?? null,
  errors: [...schemaErrors(object), ...fieldErrors[index]],
}));
process.stdout.write(JSON.stringify(report) + "\n");
